// Command layerbench times making a build-tree layer (images/layer.Build)
// from a Meson build directory: cold (empty cache: meson install, scan,
// hash, bake the layer image over the base) and warm (the layer is cached:
// meson install, scan, hash),
// alternating, and prints each run, the medians and the time per MB.
// bench/layer.sh runs it.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"time"

	"github.com/vmharness/vmharness/images/layer"
)

func main() {
	buildDir := flag.String("build-dir", "", "Meson build directory")
	base := flag.String("base", "", "the image's rootfs.img the layer goes over")
	work := flag.String("work", "", "directory for the caches the runs use")
	runs := flag.Int("runs", 3, "cold and warm builds to time")
	flag.Parse()
	if err := run(*buildDir, *base, *work, *runs); err != nil {
		fmt.Fprintln(os.Stderr, "layerbench:", err)
		os.Exit(1)
	}
}

// mbRE pulls the installed size out of Build's log line.
var mbRE = regexp.MustCompile(`, ([0-9.]+) MB from `)

func run(buildDir, base, work string, runs int) error {
	if buildDir == "" || base == "" || work == "" {
		return fmt.Errorf("usage: layerbench -build-dir DIR -base ROOTFS -work DIR [-runs N]")
	}
	var cold, warm []float64
	var mb float64
	var path string
	for i := 1; i <= runs; i++ {
		cache := filepath.Join(work, fmt.Sprintf("cache-%d", i))
		for _, kind := range []string{"cold", "warm"} {
			var line string
			logf := func(format string, args ...any) { line = fmt.Sprintf(format, args...) }
			start := time.Now()
			p, release, err := layer.Build(context.Background(), layer.Options{BuildDir: buildDir, Base: base, CacheDir: cache, Logf: logf})
			if err != nil {
				return err
			}
			secs := time.Since(start).Seconds()
			release()
			if m := mbRE.FindStringSubmatch(line); m != nil {
				mb, _ = strconv.ParseFloat(m[1], 64)
			}
			if kind == "cold" {
				cold = append(cold, secs)
			} else {
				warm = append(warm, secs)
			}
			path = p
			fmt.Printf("run %d %s: %.2f s  (%s)\n", i, kind, secs, line)
		}
	}
	c, w := median(cold), median(warm)
	fmt.Printf("median of %d: new layer %.2f s (%.1f ms/MB for %.1f MB), cached layer %.2f s (%.1f ms/MB)\n",
		runs, c, 1000*c/mb, mb, w, 1000*w/mb)
	fmt.Println(path)
	return nil
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
