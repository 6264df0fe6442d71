// Package qcow2 writes copy-on-write disk images in QEMU's qcow2 format
// (version 3): an image that holds a given set of clusters and reads
// everything else from a backing file. vmharness uses it for build-tree
// layers: the clusters of a base image that writing the project's files
// into it changed, over the unchanged base.
//
// Only what such an image needs is written: no snapshots, no compression,
// no encryption, no extended L2 entries, 64 KiB clusters and 16-bit
// refcounts, every cluster referenced once. The format is QEMU's
// docs/interop/qcow2.txt.
package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sort"
)

// ClusterSize is the size of the clusters Write stores (qcow2's default).
const ClusterSize = 1 << clusterBits

const (
	clusterBits    = 16
	l2Entries      = ClusterSize / 8 // 8-byte entries per L2 table
	refcountOrder  = 4               // 16-bit refcounts
	refcountsPerRB = ClusterSize / 2 // refcounts per refcount block
	headerLength   = 104             // version 3 header, no optional fields
	magic          = 0x514649fb      // "QFI\xfb"

	extBackingFormat = 0xe2792aca
	extEnd           = 0

	// copiedFlag marks an L1 or L2 entry whose cluster has refcount 1,
	// as QEMU's own writer does; `qemu-img check` wants it.
	copiedFlag = 1 << 63
)

// Overlay describes the image Write produces.
type Overlay struct {
	// Size is the virtual disk size in bytes, a multiple of 512.
	Size int64
	// BackingFile is the path QEMU opens for every cluster the image
	// does not hold (best absolute); BackingFormat is its format, "raw"
	// or "qcow2".
	BackingFile   string
	BackingFormat string
	// Clusters are the indices (offset / ClusterSize) of the clusters the
	// image holds, in any order, without duplicates.
	Clusters []int64
	// Data supplies each held cluster's contents: Data.ReadAt at
	// index*ClusterSize. A last cluster past Size reads short; the rest
	// is zero.
	Data io.ReaderAt
}

// Write writes o as a qcow2 image to w, front to back.
func Write(w io.Writer, o Overlay) error {
	if o.Size <= 0 || o.Size%512 != 0 {
		return fmt.Errorf("qcow2: virtual size %d is not a positive multiple of 512", o.Size)
	}
	if o.BackingFile == "" || len(o.BackingFile) > 1023 {
		return errors.New("qcow2: backing file name must have 1 to 1023 bytes")
	}
	if o.BackingFormat == "" || len(o.BackingFormat) > 16 {
		return errors.New("qcow2: backing format name must have 1 to 16 bytes")
	}
	virtualClusters := (o.Size + ClusterSize - 1) / ClusterSize
	clusters := append([]int64(nil), o.Clusters...)
	sort.Slice(clusters, func(i, j int) bool { return clusters[i] < clusters[j] })
	for i, c := range clusters {
		if c < 0 || c >= virtualClusters {
			return fmt.Errorf("qcow2: cluster %d is outside the %d-byte disk", c, o.Size)
		}
		if i > 0 && clusters[i-1] == c {
			return fmt.Errorf("qcow2: cluster %d given twice", c)
		}
	}

	l := newLayout(virtualClusters, clusters)
	header, err := l.header(o)
	if err != nil {
		return err
	}
	if _, err := w.Write(header); err != nil {
		return err
	}
	for _, table := range [][]byte{l.l1(), l.refcountTable(), l.refcountBlocks(), l.l2Tables(clusters)} {
		if _, err := w.Write(table); err != nil {
			return err
		}
	}
	buf := make([]byte, ClusterSize)
	for _, c := range clusters {
		clear(buf)
		n, err := o.Data.ReadAt(buf, c*ClusterSize)
		if err != nil && !(errors.Is(err, io.EOF) && c == virtualClusters-1) {
			return fmt.Errorf("qcow2: reading cluster %d: %w", c, err)
		}
		clear(buf[n:])
		if _, err := w.Write(buf); err != nil {
			return err
		}
	}
	return nil
}

// layout is where each part of the image goes, in clusters of the image
// file: the header, the L1 table, the refcount table, the refcount
// blocks, the L2 tables and then the data, in that order.
type layout struct {
	l1Entries      int64
	l1Clusters     int64
	rtClusters     int64 // refcount table
	rbClusters     int64 // refcount blocks
	l2Clusters     int64
	dataClusters   int64
	l2Index        map[int64]int64 // L1 index -> which L2 table (0-based)
	l1Off, rtOff   int64
	rbOff, l2Off   int64
	dataOff, total int64 // in clusters
}

func newLayout(virtualClusters int64, clusters []int64) *layout {
	l := &layout{l2Index: map[int64]int64{}}
	l.l1Entries = (virtualClusters + l2Entries - 1) / l2Entries
	l.l1Clusters = ceilDiv(l.l1Entries*8, ClusterSize)
	for _, c := range clusters {
		if _, ok := l.l2Index[c/l2Entries]; !ok {
			l.l2Index[c/l2Entries] = int64(len(l.l2Index))
		}
	}
	l.l2Clusters = int64(len(l.l2Index))
	l.dataClusters = int64(len(clusters))
	// The refcount blocks count themselves and the table that points at
	// them: grow both until they cover every cluster of the file.
	l.rbClusters, l.rtClusters = 1, 1
	for {
		total := 1 + l.l1Clusters + l.rtClusters + l.rbClusters + l.l2Clusters + l.dataClusters
		rb := ceilDiv(total, refcountsPerRB)
		rt := ceilDiv(rb*8, ClusterSize)
		if rb == l.rbClusters && rt == l.rtClusters {
			l.total = total
			break
		}
		l.rbClusters, l.rtClusters = max(rb, l.rbClusters), max(rt, l.rtClusters)
	}
	l.l1Off = 1
	l.rtOff = l.l1Off + l.l1Clusters
	l.rbOff = l.rtOff + l.rtClusters
	l.l2Off = l.rbOff + l.rbClusters
	l.dataOff = l.l2Off + l.l2Clusters
	return l
}

func (l *layout) header(o Overlay) ([]byte, error) {
	h := make([]byte, ClusterSize)
	be := binary.BigEndian
	// Header extensions follow the header; the backing file name
	// follows them (qcow2.txt: it must be in the first cluster).
	ext := headerLength
	be.PutUint32(h[ext:], extBackingFormat)
	be.PutUint32(h[ext+4:], uint32(len(o.BackingFormat)))
	copy(h[ext+8:], o.BackingFormat)
	ext += 8 + int(ceilDiv(int64(len(o.BackingFormat)), 8)*8)
	be.PutUint32(h[ext:], extEnd)
	be.PutUint32(h[ext+4:], 0)
	backingOff := ext + 8
	if backingOff+len(o.BackingFile) > ClusterSize {
		return nil, errors.New("qcow2: backing file name does not fit the header cluster")
	}
	copy(h[backingOff:], o.BackingFile)

	be.PutUint32(h[0:], magic)
	be.PutUint32(h[4:], 3) // version
	be.PutUint64(h[8:], uint64(backingOff))
	be.PutUint32(h[16:], uint32(len(o.BackingFile)))
	be.PutUint32(h[20:], clusterBits)
	be.PutUint64(h[24:], uint64(o.Size))
	be.PutUint32(h[32:], 0) // no encryption
	be.PutUint32(h[36:], uint32(l.l1Entries))
	be.PutUint64(h[40:], uint64(l.l1Off*ClusterSize))
	be.PutUint64(h[48:], uint64(l.rtOff*ClusterSize))
	be.PutUint32(h[56:], uint32(l.rtClusters))
	// 60: no snapshots; 72, 80, 88: no incompatible, compatible or
	// autoclear features (a cleanly closed image).
	be.PutUint32(h[96:], refcountOrder)
	be.PutUint32(h[100:], headerLength)
	return h, nil
}

func (l *layout) l1() []byte {
	b := make([]byte, l.l1Clusters*ClusterSize)
	for l1Idx, table := range l.l2Index {
		off := uint64((l.l2Off + table) * ClusterSize)
		binary.BigEndian.PutUint64(b[l1Idx*8:], off|copiedFlag)
	}
	return b
}

func (l *layout) refcountTable() []byte {
	b := make([]byte, l.rtClusters*ClusterSize)
	for i := int64(0); i < l.rbClusters; i++ {
		binary.BigEndian.PutUint64(b[i*8:], uint64((l.rbOff+i)*ClusterSize))
	}
	return b
}

func (l *layout) refcountBlocks() []byte {
	b := make([]byte, l.rbClusters*ClusterSize)
	for c := int64(0); c < l.total; c++ {
		binary.BigEndian.PutUint16(b[c*2:], 1)
	}
	return b
}

func (l *layout) l2Tables(clusters []int64) []byte {
	b := make([]byte, l.l2Clusters*ClusterSize)
	for i, c := range clusters {
		table := l.l2Index[c/l2Entries]
		entry := table*ClusterSize + (c%l2Entries)*8
		off := uint64((l.dataOff + int64(i)) * ClusterSize)
		binary.BigEndian.PutUint64(b[entry:], off|copiedFlag)
	}
	return b
}

func ceilDiv(a, b int64) int64 { return (a + b - 1) / b }
