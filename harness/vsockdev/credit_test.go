package vsockdev

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// creditState describes a connection's guest→host flow-control state, for
// failure messages.
func creditState(c *Conn) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dev.mu.Lock()
	inCtrl, inData := c.inCtrl, c.inData
	c.dev.mu.Unlock()
	return fmt.Sprintf("host: buf_alloc=%d rx_cnt=%d fwd_cnt=%d last_fwd_sent=%d peak_inflight=%d buffered=%d need_credit_update=%v in_ctrlq=%v in_dataq=%v removed=%v err=%v",
		c.bufAlloc, c.rxCnt, c.fwdCnt, c.lastFwdSent, c.peakInflight, c.rbuf.len(), c.needCreditUpdate, inCtrl, inData, c.removed, c.err)
}

// creditSim is one guest→host connection run deterministically on one
// goroutine: a guest sender modelled on Linux's virtio transport, the
// device's queue handlers called directly on in-memory queues, and a host
// reader, interleaved in an order a seeded PRNG picks. Each step is one of
// the things that happen concurrently in a real VM, so every interleaving
// of them is one the device can meet.
type creditSim struct {
	t   *testing.T
	rng *rand.Rand
	p   creditSimParams

	dev    *Device
	rx, tx *fakeQueue
	conn   *Conn

	// The guest socket, as Linux keeps it: tx_cnt counts bytes when
	// the writer queues them (not when the device takes them), and the
	// credit is min(peer buf_alloc, own buffer) - (tx_cnt - peer_fwd_cnt).
	peerBufAlloc, peerFwdCnt, txCnt uint32
	// Packets the guest queued but has not placed on the tx ring yet
	// (Linux's send_pkt_queue, drained by its tx worker).
	queued [][][]byte

	stream []byte // everything the guest's writer sends
	sent   int    // bytes of stream the guest has queued
	got    []byte // bytes the host reader has read
	steps  int
}

type creditSimParams struct {
	hostBuf     uint32 // Config.BufferSize: the host's buf_alloc
	guestWindow uint32 // the guest's own buffer, which caps its credit
	maxPacket   int    // the largest write the guest's sender makes
	maxRead     int    // the largest host Read
	// lazyReader: the host reads only when nothing else can happen,
	// and then with a buffer of maxRead bytes, so one Read may take
	// everything the guest sent since the last credit update.
	lazyReader bool
	size       int // bytes to send
}

const simGuestPort, simHostPort = 5000, 1000

func newCreditSim(t *testing.T, p creditSimParams, seed uint64) *creditSim {
	s := &creditSim{
		t:   t,
		rng: rand.New(rand.NewPCG(seed, 0x76736f636b)),
		p:   p,
		dev: New(Config{GuestCID: 3, BufferSize: p.hostBuf}),
		rx:  newFakeQueue(func() {}),
		tx:  newFakeQueue(func() {}),
	}
	t.Cleanup(func() { s.dev.Close() })
	s.stream = stressStream(seed, p.size)
	ln, err := s.dev.Listen(simHostPort)
	require.NoError(t, err)
	s.tx.Add(encodeChain(s.header(OpRequest, 0), nil), nil)
	_, err = s.dev.serveTx(s.tx)
	require.NoError(t, err)
	c, err := ln.Accept()
	require.NoError(t, err)
	s.conn = c.(*Conn)
	for range 8 {
		s.rx.Add(nil, []int{HeaderLen + 4096})
	}
	_, err = s.dev.serveRx(s.rx)
	require.NoError(t, err)
	require.True(t, s.guestRx(), "the RESPONSE")
	require.Equal(t, p.hostBuf, s.peerBufAlloc, "the RESPONSE carries the host's buf_alloc")
	return s
}

func (s *creditSim) header(op Op, n int) Header {
	return Header{
		SrcCID: 3, DstCID: HostCID, SrcPort: simGuestPort, DstPort: simHostPort,
		Type: TypeStream, Op: op, Len: uint32(n), BufAlloc: s.p.guestWindow,
	}
}

func (s *creditSim) credit() int {
	limit := min(s.peerBufAlloc, s.p.guestWindow)
	inflight := s.txCnt - s.peerFwdCnt
	if inflight >= limit {
		return 0
	}
	return int(limit - inflight)
}

// guestWrite queues one packet, as much as the writer has and the credit
// allows.
func (s *creditSim) guestWrite() bool {
	credit := s.credit()
	if s.sent == len(s.stream) || credit == 0 {
		return false
	}
	n := min(1+s.rng.IntN(s.p.maxPacket), credit, MaxPayload, len(s.stream)-s.sent)
	s.queued = append(s.queued, encodeChain(s.header(OpRW, n), s.stream[s.sent:s.sent+n]))
	s.sent += n
	s.txCnt += uint32(n)
	return true
}

// guestTx places queued packets on the tx ring.
func (s *creditSim) guestTx() bool {
	if len(s.queued) == 0 {
		return false
	}
	k := 1 + s.rng.IntN(len(s.queued))
	for _, p := range s.queued[:k] {
		s.tx.Add(p, nil)
	}
	s.queued = s.queued[k:]
	return true
}

func (s *creditSim) deviceTx() bool {
	s.tx.mu.Lock()
	waiting := len(s.tx.avail)
	s.tx.mu.Unlock()
	if waiting == 0 {
		return false
	}
	_, err := s.dev.serveTx(s.tx)
	require.NoError(s.t, err)
	for len(s.tx.used) > 0 {
		<-s.tx.used
	}
	return true
}

func (s *creditSim) hostRead() bool {
	s.conn.mu.Lock()
	buffered := s.conn.rbuf.len()
	s.conn.mu.Unlock()
	if buffered == 0 {
		return false // Read would block
	}
	size := 1 + s.rng.IntN(s.p.maxRead)
	if s.p.lazyReader {
		size = s.p.maxRead
	}
	buf := make([]byte, size)
	n, err := s.conn.Read(buf)
	require.NoError(s.t, err)
	s.got = append(s.got, buf[:n]...)
	return true
}

func (s *creditSim) deviceRx() bool {
	s.dev.mu.Lock()
	owed := s.dev.ctrlq.len() + s.dev.dataq.len()
	s.dev.mu.Unlock()
	if owed == 0 {
		return false
	}
	_, err := s.dev.serveRx(s.rx)
	require.NoError(s.t, err)
	return true
}

// guestRx handles one packet from the device and posts a fresh buffer.
func (s *creditSim) guestRx() bool {
	var u fakeUsed
	select {
	case u = <-s.rx.used:
	default:
		return false
	}
	s.rx.Add(nil, []int{HeaderLen + 4096})
	h, err := DecodeHeader(u.written)
	require.NoError(s.t, err)
	require.Contains(s.t, []Op{OpResponse, OpCreditUpdate}, h.Op, "%v", &h)
	s.peerBufAlloc, s.peerFwdCnt = h.BufAlloc, h.FwdCnt
	return true
}

// run interleaves the steps at random until the host has read everything,
// failing if a state is reached in which nothing can happen any more.
func (s *creditSim) run() {
	steps := []func() bool{s.guestWrite, s.guestTx, s.deviceTx, s.deviceRx, s.guestRx}
	if !s.p.lazyReader {
		steps = append(steps, s.hostRead)
	}
	for len(s.got) < len(s.stream) {
		s.steps++
		if steps[s.rng.IntN(len(steps))]() {
			continue
		}
		progress := false
		for _, i := range s.rng.Perm(len(steps)) {
			if steps[i]() {
				progress = true
				break
			}
		}
		if !progress && s.p.lazyReader {
			progress = s.hostRead()
		}
		if !progress {
			s.t.Fatalf("stalled after %d steps, %d of %d bytes read: guest: window=%d peer_buf_alloc=%d tx_cnt=%d peer_fwd_cnt=%d credit=%d queued=%d; %s",
				s.steps, len(s.got), len(s.stream), s.p.guestWindow, s.peerBufAlloc, s.txCnt, s.peerFwdCnt, s.credit(), len(s.queued), creditState(s.conn))
		}
	}
	require.True(s.t, bytes.Equal(s.stream, s.got), "the host read the guest's bytes in order")
}

// TestCreditModel checks the host's credit updates for liveness over many
// random interleavings: whatever the guest's window, packet sizes and the
// host reader's pace, a guest out of credit always gets more once the
// host reader has caught up, and every byte arrives in order.
func TestCreditModel(t *testing.T) {
	tests := []struct {
		name  string
		p     creditSimParams
		seeds int
	}{
		{"journald: Linux window equals the host buffer", creditSimParams{hostBuf: 256 << 10, guestWindow: 256 << 10, maxPacket: 2000, maxRead: 4096, size: 1 << 20}, 10},
		{"guest window far below half the host buffer", creditSimParams{hostBuf: 1 << 20, guestWindow: 64 << 10, maxPacket: 3000, maxRead: 8192, size: 512 << 10}, 20},
		{"guest window exactly half the host buffer", creditSimParams{hostBuf: 64 << 10, guestWindow: 32 << 10, maxPacket: 1000, maxRead: 1000, size: 512 << 10}, 20},
		{"guest window just over half the host buffer", creditSimParams{hostBuf: 64 << 10, guestWindow: 32<<10 + 1, maxPacket: 1000, maxRead: 1000, size: 512 << 10}, 20},
		{"guest window just under the host buffer", creditSimParams{hostBuf: 64 << 10, guestWindow: 64<<10 - 1, maxPacket: 5000, maxRead: 300, size: 256 << 10}, 20},
		{"tiny host buffer, tiny packets", creditSimParams{hostBuf: 512, guestWindow: 512, maxPacket: 64, maxRead: 100, size: 64 << 10}, 20},
		{"tiny window, byte-wise reads", creditSimParams{hostBuf: 4096, guestWindow: 100, maxPacket: 64, maxRead: 1, size: 8 << 10}, 20},
		{"big packets, big reads", creditSimParams{hostBuf: 256 << 10, guestWindow: 256 << 10, maxPacket: MaxPayload, maxRead: 256 << 10, size: 2 << 20}, 10},
		{"odd sizes", creditSimParams{hostBuf: 10007, guestWindow: 7919, maxPacket: 997, maxRead: 1499, size: 256 << 10}, 20},
		{"lazy reader takes everything at once", creditSimParams{hostBuf: 64 << 10, guestWindow: 64 << 10, maxPacket: 1000, maxRead: 1 << 20, size: 512 << 10, lazyReader: true}, 10},
		{"lazy reader, guest window below half the host buffer", creditSimParams{hostBuf: 256 << 10, guestWindow: 48 << 10, maxPacket: 1000, maxRead: 1 << 20, size: 512 << 10, lazyReader: true}, 10},
		{"lazy reader, small reads", creditSimParams{hostBuf: 16 << 10, guestWindow: 16 << 10, maxPacket: 700, maxRead: 3000, size: 256 << 10, lazyReader: true}, 10},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for seed := range uint64(tt.seeds) {
				t.Run(fmt.Sprint("seed ", seed), func(t *testing.T) {
					newCreditSim(t, tt.p, seed).run()
				})
			}
		})
	}
}

// stressReader is how the host side of TestCreditStress reads.
type stressReader struct {
	maxRead int           // the largest Read
	full    bool          // every Read offers all maxRead bytes
	pause   time.Duration // the longest pause between Reads
	// burst: one Read in burst pauses for up to 50 ms instead, so the
	// guest runs out of credit with the host's buffer full.
	burst int
}

// TestCreditStress runs guests that send faster than the host reads, over
// both backends (the vhost-user one with Linux's notification rules), and
// checks that no connection ever stalls and every byte arrives in order.
func TestCreditStress(t *testing.T) {
	tests := []struct {
		name     string
		cfg      Config
		gopts    guestOptions
		conns    int
		size     int // bytes per connection
		maxEntry int // the largest guest write (a journal entry)
		reader   stressReader
	}{
		{"journald-like entries, bursty reader", Config{}, guestOptions{capCredit: true}, 1, 2 << 20, 2000,
			stressReader{maxRead: 4096, pause: 100 * time.Microsecond, burst: 200}},
		{"guest window below half the host buffer", Config{BufferSize: 1 << 20}, guestOptions{bufAlloc: 48 << 10, capCredit: true}, 2, 2 << 20, 3000,
			stressReader{maxRead: 8192, pause: 200 * time.Microsecond, burst: 100}},
		{"small host buffer, many small packets", Config{BufferSize: 1024}, guestOptions{capCredit: true}, 2, 256 << 10, 100,
			stressReader{maxRead: 300, pause: 50 * time.Microsecond, burst: 500}},
		{"byte-wise reader", Config{BufferSize: 4096}, guestOptions{capCredit: true}, 1, 64 << 10, 500,
			stressReader{maxRead: 1, burst: 5000}},
		{"concurrent connections", Config{BufferSize: 16 << 10}, guestOptions{capCredit: true}, 8, 512 << 10, 1500,
			stressReader{maxRead: 2048, pause: 200 * time.Microsecond, burst: 100}},
		{"full tx ring, small packets", Config{BufferSize: 64 << 10}, guestOptions{capCredit: true, txSlots: 1 << 12, rxBuffers: 1 << 12}, 4, 1 << 20, 200,
			stressReader{maxRead: 1024, pause: 100 * time.Microsecond, burst: 200}},
		{"sleepy reader takes everything at once", Config{}, guestOptions{capCredit: true}, 1, 4 << 20, 2000,
			stressReader{maxRead: 1 << 20, full: true, burst: 2}},
		{"big writes, slow reader", Config{BufferSize: 64 << 10}, guestOptions{}, 2, 8 << 20, 256 << 10,
			stressReader{maxRead: 32 << 10, pause: time.Millisecond, burst: 50}},
	}
	forEachBackend(t, func(t *testing.T, b backend) {
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				checkGoroutines(t)
				e := b.new(t, tt.cfg, tt.gopts)
				l, err := e.dev.Listen(1000)
				require.NoError(t, err)
				var writers, readers sync.WaitGroup
				errs := make(chan error, 2*tt.conns)
				for i := range tt.conns {
					gs, err := e.g.Dial(1000)
					require.NoError(t, err)
					c, err := l.Accept()
					require.NoError(t, err)
					hc := c.(*Conn)
					seed := uint64(i + 1)
					writers.Add(1)
					readers.Add(1)
					go func() {
						defer writers.Done()
						if err := stressWrite(gs, seed, tt.size, tt.maxEntry); err != nil {
							errs <- fmt.Errorf("connection %d: guest write: %w", i, err)
						}
					}()
					go func() {
						defer readers.Done()
						defer hc.Close()
						if err := stressRead(hc, seed, tt.size, tt.reader); err != nil {
							gs.mu.Lock()
							guest := fmt.Sprintf("guest: tx_cnt=%d peer_fwd_cnt=%d peer_buf_alloc=%d credit=%d credit_waits=%d",
								gs.txCnt, gs.peerFwdCnt, gs.peerBufAlloc, gs.credit(), gs.creditWaits)
							gs.mu.Unlock()
							errs <- fmt.Errorf("connection %d: host read: %w\n%s\n%s%s", i, err, guest, creditState(hc), e.queueState())
						}
					}()
				}
				readers.Wait()
				if len(errs) > 0 {
					// A stalled writer may wait for a tx slot
					// that never comes back; stopping the guest
					// releases it.
					e.g.stop()
				}
				writers.Wait()
				if n := e.g.txFull.Load(); n > 0 {
					t.Logf("the guest's senders found the tx ring full %d times", n)
				}
				close(errs)
				for err := range errs {
					t.Error(err)
				}
			})
		}
	})
}

// stressWrite sends size bytes of the seed's stream as writes of 1 to
// maxEntry bytes, then shuts down sending.
func stressWrite(gs *gsock, seed uint64, size, maxEntry int) error {
	data := stressStream(seed, size)
	rng := rand.New(rand.NewPCG(seed, 1))
	for len(data) > 0 {
		n := min(1+rng.IntN(maxEntry), len(data))
		if _, err := gs.Write(data[:n]); err != nil {
			return err
		}
		data = data[n:]
	}
	return gs.CloseWrite()
}

// stressRead reads the seed's stream to EOF at the reader's pace and checks
// it. A connection that delivers nothing for 20 s fails it.
func stressRead(hc *Conn, seed uint64, size int, r stressReader) error {
	want := stressStream(seed, size)
	rng := rand.New(rand.NewPCG(seed, 2))
	buf := make([]byte, r.maxRead)
	got := 0
	for {
		if err := hc.SetReadDeadline(time.Now().Add(20 * time.Second)); err != nil {
			return err
		}
		ask := 1 + rng.IntN(r.maxRead)
		if r.full {
			ask = r.maxRead
		}
		n, err := hc.Read(buf[:ask])
		if n > 0 {
			if got+n > size || !bytes.Equal(buf[:n], want[got:got+n]) {
				return fmt.Errorf("bytes %d..%d differ from what the guest sent", got, got+n)
			}
			got += n
		}
		switch {
		case errors.Is(err, io.EOF):
			if got != size {
				return fmt.Errorf("EOF after %d of %d bytes", got, size)
			}
			return nil
		case errors.Is(err, os.ErrDeadlineExceeded):
			return fmt.Errorf("stalled: nothing for 20 s after %d of %d bytes", got, size)
		case err != nil:
			return fmt.Errorf("after %d of %d bytes: %w", got, size, err)
		}
		switch {
		case r.burst > 0 && rng.IntN(r.burst) == 0:
			time.Sleep(time.Duration(rng.Int64N(int64(50 * time.Millisecond))))
		case r.pause > 0:
			time.Sleep(time.Duration(rng.Int64N(int64(r.pause))))
		}
	}
}

// stressStream is size bytes of deterministic content for seed.
func stressStream(seed uint64, size int) []byte {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	b := make([]byte, size)
	rand.NewChaCha8(key).Read(b)
	return b
}

// queueState describes the test driver's rings, if the env has them.
func (e *env) queueState() string {
	if e.driver == nil {
		return ""
	}
	var s string
	for _, q := range []struct {
		name  string
		index int
	}{{"rx", rxQueue}, {"tx", txQueue}} {
		name, q := q.name, e.driver.Queue(q.index)
		used, inDevice := q.Pending()
		s += fmt.Sprintf("\n%s ring: %d used chains not yet seen by the guest, %d chains with the device, %d kicks the device did not ask for",
			name, used, inDevice, q.SuppressedKicks())
	}
	return s
}
