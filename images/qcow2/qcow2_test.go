package qcow2

import (
	"bytes"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func requireQEMUImg(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img (qemu-utils) is not installed; it is the reference reader")
	}
}

// TestWriteReadByQEMU writes overlays over a random backing file and has
// qemu-img, the reference implementation, check them and compare what a
// guest would read with the expected disk.
func TestWriteReadByQEMU(t *testing.T) {
	requireQEMUImg(t)
	tests := []struct {
		name     string
		size     int64
		clusters []int64
	}{
		{"no clusters", 4 << 20, nil},
		{"first and last", 4 << 20, []int64{0, 63}},
		{"unsorted", 4 << 20, []int64{9, 2, 40, 3}},
		{"partial last cluster", 4<<20 + 4096, []int64{1, 64}},
		// Two L2 tables: an L2 table maps 512 MiB.
		{"sparse over two L2 tables", 1<<30 + 1<<20, []int64{5, 8192, 8192 + 15}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			base := filepath.Join(dir, "base.raw")
			changed := filepath.Join(dir, "changed.raw")
			rng := rand.New(rand.NewSource(int64(len(tt.clusters))))
			writeSparse(t, base, tt.size, rng, 7)
			require.NoError(t, copyFile(base, changed))

			f, err := os.OpenFile(changed, os.O_RDWR, 0)
			require.NoError(t, err)
			for _, c := range tt.clusters {
				buf := make([]byte, ClusterSize)
				rng.Read(buf)
				n := min(int64(ClusterSize), tt.size-c*ClusterSize)
				_, err := f.WriteAt(buf[:n], c*ClusterSize)
				require.NoError(t, err)
			}
			require.NoError(t, f.Close())

			data, err := os.Open(changed)
			require.NoError(t, err)
			defer data.Close()
			var img bytes.Buffer
			require.NoError(t, Write(&img, Overlay{Size: tt.size, BackingFile: base, BackingFormat: "raw", Clusters: tt.clusters, Data: data}))
			out := filepath.Join(dir, "layer.qcow2")
			require.NoError(t, os.WriteFile(out, img.Bytes(), 0o644))

			check, err := exec.Command("qemu-img", "check", "-f", "qcow2", out).CombinedOutput()
			require.NoError(t, err, "qemu-img check: %s", check)
			assert.Contains(t, string(check), "No errors were found")
			cmp, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", out, changed).CombinedOutput()
			require.NoError(t, err, "qemu-img compare: %s", cmp)
			assert.Contains(t, string(cmp), "Images are identical")
			info, err := exec.Command("qemu-img", "info", out).CombinedOutput()
			require.NoError(t, err)
			assert.Contains(t, string(info), "backing file: "+base)
			assert.Contains(t, string(info), "backing file format: raw")
		})
	}
}

// TestWriteDetectsAChangeItDoesNotHold makes sure the comparison above
// can fail: an overlay missing one changed cluster differs.
func TestWriteDetectsAChangeItDoesNotHold(t *testing.T) {
	requireQEMUImg(t)
	dir := t.TempDir()
	base, changed := filepath.Join(dir, "base.raw"), filepath.Join(dir, "changed.raw")
	rng := rand.New(rand.NewSource(1))
	writeSparse(t, base, 1<<20, rng, 3)
	require.NoError(t, copyFile(base, changed))
	f, err := os.OpenFile(changed, os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte("changed"), 3*ClusterSize+100)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	data, err := os.Open(changed)
	require.NoError(t, err)
	defer data.Close()
	out := filepath.Join(dir, "layer.qcow2")
	var img bytes.Buffer
	require.NoError(t, Write(&img, Overlay{Size: 1 << 20, BackingFile: base, BackingFormat: "raw", Data: data}))
	require.NoError(t, os.WriteFile(out, img.Bytes(), 0o644))
	cmp, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", out, changed).CombinedOutput()
	require.Error(t, err)
	assert.Contains(t, string(cmp), "Content mismatch at offset 196608")
}

func TestWriteRefuses(t *testing.T) {
	ok := Overlay{Size: 1 << 20, BackingFile: "/b", BackingFormat: "raw", Data: bytes.NewReader(nil)}
	tests := []struct {
		name   string
		modify func(*Overlay)
		want   string
	}{
		{"size not sector aligned", func(o *Overlay) { o.Size = 1000 }, "not a positive multiple of 512"},
		{"no backing file", func(o *Overlay) { o.BackingFile = "" }, "backing file name"},
		{"no backing format", func(o *Overlay) { o.BackingFormat = "" }, "backing format"},
		{"cluster outside", func(o *Overlay) { o.Clusters = []int64{16} }, "cluster 16 is outside"},
		{"cluster twice", func(o *Overlay) { o.Clusters = []int64{2, 2} }, "cluster 2 given twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := ok
			tt.modify(&o)
			err := Write(&bytes.Buffer{}, o)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

// TestLayoutRefcountBlocks covers files too big to write in a test: the
// refcount blocks must cover every cluster of the file, themselves
// included.
func TestLayoutRefcountBlocks(t *testing.T) {
	tests := []struct {
		name             string
		virtualClusters  int64
		dataClusters     int64
		wantRB, wantRT   int64
		wantL1Clusters   int64
		wantL2ForAllData int64
	}{
		{"tiny", 16, 1, 1, 1, 1, 1},
		{"fits one block exactly", 1 << 20, refcountsPerRB - 1 - 1 - 1 - 1 - 128, 1, 1, 1, 128},
		{"one cluster more", 1 << 20, refcountsPerRB - 1 - 1 - 1 - 1 - 128 + 1, 2, 1, 1, 128},
		{"2 TiB disk, 4 GiB of data", 1 << 25, 1 << 16, 3, 1, 1, 4096},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clusters := make([]int64, tt.dataClusters)
			for i := range clusters {
				clusters[i] = int64(i) * (tt.virtualClusters / tt.dataClusters)
			}
			l := newLayout(tt.virtualClusters, clusters)
			assert.Equal(t, tt.wantRB, l.rbClusters, "refcount blocks")
			assert.Equal(t, tt.wantRT, l.rtClusters, "refcount table clusters")
			assert.Equal(t, tt.wantL1Clusters, l.l1Clusters, "L1 clusters")
			assert.Equal(t, tt.wantL2ForAllData, l.l2Clusters, "L2 tables")
			assert.Equal(t, 1+l.l1Clusters+l.rtClusters+l.rbClusters+l.l2Clusters+l.dataClusters, l.total)
			assert.GreaterOrEqual(t, l.rbClusters*refcountsPerRB, l.total, "every cluster has a refcount")
			assert.Less(t, (l.rbClusters-1)*refcountsPerRB, l.total, "no refcount block more than needed")
		})
	}
}

// writeSparse makes a sparse file of size bytes with random data in
// every stride-th cluster.
func writeSparse(t *testing.T, path string, size int64, rng *rand.Rand, stride int64) {
	t.Helper()
	f, err := os.Create(path)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(size))
	buf := make([]byte, ClusterSize)
	for off := int64(0); off < size && off < 64<<20; off += stride * ClusterSize {
		rng.Read(buf)
		_, err := f.WriteAt(buf[:min(int64(len(buf)), size-off)], off)
		require.NoError(t, err)
	}
	require.NoError(t, f.Close())
}

func copyFile(from, to string) error {
	return exec.Command("cp", "--sparse=always", from, to).Run()
}
