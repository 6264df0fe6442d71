package images

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"sync"
	"time"
)

// progressLog writes concise, prefixed progress lines ("vmharness: image
// default: ...") and times named steps.
type progressLog struct {
	mu     sync.Mutex
	w      io.Writer
	prefix string
}

func newProgressLog(w io.Writer, name string) *progressLog {
	return &progressLog{w: w, prefix: "vmharness: image " + name + ": "}
}

func (l *progressLog) printf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(l.w, l.prefix+format+"\n", args...)
}

// step runs fn as a named step, logging its start and how long it took.
func (l *progressLog) step(name string, fn func() error) error {
	l.printf("%s ...", name)
	start := time.Now()
	if err := fn(); err != nil {
		l.printf("%s failed after %s", name, time.Since(start).Round(100*time.Millisecond))
		return err
	}
	l.printf("%s done in %s", name, time.Since(start).Round(100*time.Millisecond))
	return nil
}

func jsonIndent(v any) ([]byte, error) {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

func sortByLength(s []string) {
	sort.SliceStable(s, func(i, j int) bool { return len(s[i]) < len(s[j]) })
}
