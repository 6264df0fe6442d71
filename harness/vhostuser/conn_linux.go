package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/vmharness/vmharness/harness/virtq"
)

// errRejected marks a request the back-end declines without ending the
// connection: the front-end gets a failure ack if it asked for one.
var errRejected = errors.New("request rejected")

func reject(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errRejected, fmt.Sprintf(format, args...))
}

// conn is the state of one front-end connection. Only the serve goroutine
// touches it, except running/dev calls which the kick goroutines share under
// devMu.
type conn struct {
	uc  *net.UnixConn
	dev Device
	log *slog.Logger
	nq  int

	offered       uint64
	acked         uint64
	featuresSet   bool
	protoFeatures uint64

	mem     *virtq.Memory
	retired []*virtq.Memory // replaced tables the running device may still use
	rings   []*vring

	devMu   sync.Mutex
	running bool

	oob []byte
}

// vring is the front-end's configuration of one virtqueue.
type vring struct {
	num     uint16
	addr    virtq.RingAddresses
	addrSet bool
	base    uint16
	enabled bool

	kickSet  bool // SET_VRING_KICK received (with or without an fd): ring started
	kick     *os.File
	kickDone chan struct{}
	call     *os.File
	errFile  *os.File

	q *virtq.SplitQueue // while the device runs
}

func newConn(uc *net.UnixConn, dev Device, log *slog.Logger) *conn {
	nq := dev.NumQueues()
	c := &conn{
		uc:      uc,
		dev:     dev,
		log:     log,
		nq:      nq,
		offered: dev.Features() | virtq.RingFeatures | 1<<FeatureProtocolFeatures,
		rings:   make([]*vring, nq),
		oob:     make([]byte, unix.CmsgSpace(MaxFDs*4)),
	}
	for i := range c.rings {
		c.rings[i] = &vring{}
	}
	return c
}

func (c *conn) serve() error {
	defer c.teardown()
	if c.nq < 1 || c.nq > vringIndexMask+1 {
		return fmt.Errorf("vhost-user: device has %d queues", c.nq)
	}
	for {
		h, payload, fds, err := c.read()
		if err != nil {
			closeFDs(fds)
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := c.handle(h, payload, fds); err != nil {
			return fmt.Errorf("vhost-user: %v: %w", h.Request, err)
		}
	}
}

// read reads one message. The fds arrive with the header's bytes.
func (c *conn) read() (Header, []byte, []int, error) {
	var hb [HeaderSize]byte
	var fds []int
	got := 0
	for got < HeaderSize {
		n, oobn, flags, _, err := c.uc.ReadMsgUnix(hb[got:], c.oob)
		if oobn > 0 {
			more, perr := parseRights(c.oob[:oobn])
			fds = append(fds, more...)
			if perr != nil {
				return Header{}, nil, fds, perr
			}
		}
		if flags&unix.MSG_CTRUNC != 0 {
			return Header{}, nil, fds, protoErr("too many fds (control message truncated)")
		}
		if err != nil {
			if errors.Is(err, io.EOF) && got > 0 {
				err = io.ErrUnexpectedEOF
			}
			return Header{}, nil, fds, err
		}
		if n == 0 {
			if got == 0 {
				return Header{}, nil, fds, io.EOF
			}
			return Header{}, nil, fds, io.ErrUnexpectedEOF
		}
		got += n
	}
	if len(fds) > MaxFDs {
		return Header{}, nil, fds, protoErr("%d fds in one message", len(fds))
	}
	h, err := ParseHeader(hb[:])
	if err != nil {
		return h, nil, fds, err
	}
	payload := make([]byte, h.Size)
	if _, err := io.ReadFull(c.uc, payload); err != nil {
		return h, nil, fds, fmt.Errorf("read %v payload: %w", h.Request, err)
	}
	return h, payload, fds, nil
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, protoErr("control message: %v", err)
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			return fds, protoErr("SCM_RIGHTS: %v", err)
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		_ = unix.Close(fd)
	}
}

func (c *conn) replyAckNegotiated() bool {
	return c.protoFeatures&(1<<ProtocolFeatureReplyAck) != 0
}

func (c *conn) write(r Request, payload []byte) error {
	b := AppendHeader(make([]byte, 0, HeaderSize+len(payload)), Header{Request: r, Flags: FlagVersion | FlagReply, Size: uint32(len(payload))})
	b = append(b, payload...)
	if _, err := c.uc.Write(b); err != nil {
		return fmt.Errorf("write %v reply: %w", r, err)
	}
	return nil
}

// handle processes one message, taking ownership of fds. A non-nil error
// ends the connection.
func (c *conn) handle(h Header, payload []byte, fds []int) error {
	c.log.Debug("vhost-user request", "request", h.Request.String(), "flags", h.Flags, "size", h.Size, "fds", len(fds))
	if want := expectedFDs(h.Request, payload); want >= 0 && len(fds) != want {
		closeFDs(fds)
		return protoErr("carries %d fds, want %d", len(fds), want)
	}
	reply, err := c.dispatch(h, payload, fds)
	switch {
	case err == nil:
	case errors.Is(err, errRejected):
		c.log.Warn("vhost-user request rejected", "request", h.Request.String(), "err", err)
	default:
		return err
	}
	if reply != nil {
		return c.write(h.Request, reply)
	}
	if h.Flags&FlagNeedReply != 0 && c.replyAckNegotiated() {
		status := uint64(0)
		if err != nil {
			status = 1
		}
		return c.write(h.Request, binary.LittleEndian.AppendUint64(nil, status))
	}
	return nil
}

// dispatch returns the reply payload for requests that have one.
func (c *conn) dispatch(h Header, p []byte, fds []int) ([]byte, error) {
	switch h.Request {
	case GetFeatures:
		return binary.LittleEndian.AppendUint64(nil, c.offered), nil
	case SetFeatures:
		return nil, c.setFeatures(p)
	case GetProtocolFeatures:
		return binary.LittleEndian.AppendUint64(nil, offeredProtocolFeatures), nil
	case SetProtocolFeatures:
		v, err := parseU64(h.Request, p)
		if err != nil {
			return nil, err
		}
		if v&^offeredProtocolFeatures != 0 {
			return nil, protoErr("protocol features %#x include unoffered %#x", v, v&^offeredProtocolFeatures)
		}
		c.protoFeatures = v
		return nil, nil
	case SetOwner:
		return nil, nil
	case ResetOwner, ResetDevice:
		c.reset()
		return nil, nil
	case SetMemTable:
		return nil, c.setMemTable(p, fds)
	case SetVringNum:
		return nil, c.setVringNum(p)
	case SetVringAddr:
		return nil, c.setVringAddr(p)
	case SetVringBase:
		return nil, c.setVringBase(p)
	case GetVringBase:
		return c.getVringBase(p)
	case SetVringKick, SetVringCall, SetVringErr:
		return nil, c.setVringFD(h.Request, p, fds)
	case SetVringEnable:
		return nil, c.setVringEnable(p)
	case GetQueueNum:
		return binary.LittleEndian.AppendUint64(nil, uint64(c.nq)), nil
	case GetConfig:
		return c.getConfig(p)
	case SetConfig:
		if _, _, err := parseConfig(h.Request, p); err != nil {
			return nil, err
		}
		return nil, reject("the device's config space is read-only")
	case SetLogBase, SetLogFD:
		closeFDs(fds)
		return nil, reject("dirty logging is not supported (no VHOST_USER_PROTOCOL_F_LOG_SHMFD)")
	default:
		closeFDs(fds)
		return nil, reject("unsupported request with a %d-byte payload", len(p))
	}
}

func (c *conn) setFeatures(p []byte) error {
	v, err := parseU64(SetFeatures, p)
	if err != nil {
		return err
	}
	if v&^c.offered != 0 {
		return protoErr("features %#x include unoffered %#x", v, v&^c.offered)
	}
	if c.featuresSet && v != c.acked {
		c.stopDevice()
	}
	c.acked, c.featuresSet = v, true
	return nil
}

// ring validates a queue index from the front-end.
func (c *conn) ring(index uint32) (*vring, error) {
	if index >= uint32(c.nq) {
		return nil, protoErr("queue index %d, the device has %d queues", index, c.nq)
	}
	return c.rings[index], nil
}

func (c *conn) setMemTable(p []byte, fds []int) error {
	defer closeFDs(fds) // the mappings outlive the fds
	regions, err := ParseMemTable(p)
	if err != nil {
		return err
	}
	shared := make([]virtq.SharedRegion, len(regions))
	for i, r := range regions {
		shared[i] = virtq.SharedRegion{GuestAddr: r.GuestAddr, Size: r.Size, UserAddr: r.UserAddr, MmapOffset: r.MmapOffset, FD: fds[i]}
	}
	mem, err := virtq.MapMemory(shared)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrProtocol, err)
	}
	// Queues exist only while the device runs, and a worker may read them
	// at any moment. SetMemoryAll hands mem to none of them unless it covers
	// every ring, so on failure no goroutine can hold a pointer into mem
	// and unmapping it cannot fault a worker; the queues stay on c.mem
	// until teardown stops the device.
	queues := make([]*virtq.SplitQueue, len(c.rings))
	for i, r := range c.rings {
		queues[i] = r.q
	}
	if err := virtq.SetMemoryAll(mem, queues); err != nil {
		_ = mem.Close()
		return fmt.Errorf("%w: the new memory table misses a running ring, keeping the old table: %w", ErrProtocol, err)
	}
	if c.mem != nil {
		if c.isRunning() {
			c.retired = append(c.retired, c.mem)
		} else {
			_ = c.mem.Close()
		}
	}
	c.mem = mem
	c.tryStart()
	return nil
}

func (c *conn) setVringNum(p []byte) error {
	idx, num, err := parseVringState(SetVringNum, p)
	if err != nil {
		return err
	}
	r, err := c.ring(idx)
	if err != nil {
		return err
	}
	if num == 0 || num > virtq.MaxQueueSize || num&(num-1) != 0 {
		return protoErr("queue %d size %d is not a power of two in 1..%d", idx, num, virtq.MaxQueueSize)
	}
	if r.q != nil {
		c.stopDevice()
	}
	r.num = uint16(num)
	return nil
}

func (c *conn) setVringAddr(p []byte) error {
	a, err := parseVringAddr(p)
	if err != nil {
		return err
	}
	r, err := c.ring(a.Index)
	if err != nil {
		return err
	}
	if r.q != nil {
		c.stopDevice()
	}
	r.addr = virtq.RingAddresses{Desc: a.Desc, Avail: a.Avail, Used: a.Used}
	r.addrSet = true
	c.tryStart()
	return nil
}

func (c *conn) setVringBase(p []byte) error {
	idx, num, err := parseVringState(SetVringBase, p)
	if err != nil {
		return err
	}
	r, err := c.ring(idx)
	if err != nil {
		return err
	}
	if num > 0xffff {
		return protoErr("queue %d base %d does not fit a 16-bit index", idx, num)
	}
	if r.q != nil {
		c.stopDevice()
	}
	r.base = uint16(num)
	return nil
}

// getVringBase stops the ring (and with it the device) and reports where the
// front-end should resume.
func (c *conn) getVringBase(p []byte) ([]byte, error) {
	idx, _, err := parseVringState(GetVringBase, p)
	if err != nil {
		return nil, err
	}
	r, err := c.ring(idx)
	if err != nil {
		return nil, err
	}
	c.stopDevice()
	r.stopKick()
	r.kickSet = false
	return AppendVringState(nil, idx, uint32(r.base)), nil
}

func (c *conn) setVringFD(req Request, p []byte, fds []int) error {
	v, err := parseU64(req, p)
	if err != nil {
		closeFDs(fds)
		return err
	}
	if v&^uint64(vringIndexMask|vringNoFDMask) != 0 {
		closeFDs(fds)
		return protoErr("reserved bits set in %#x", v)
	}
	r, err := c.ring(uint32(v & vringIndexMask))
	if err != nil {
		closeFDs(fds)
		return err
	}
	var f *os.File
	if len(fds) == 1 {
		if req == SetVringKick {
			// Non-blocking, so the runtime poller reads it and Close wakes
			// the kick goroutine.
			if err := unix.SetNonblock(fds[0], true); err != nil {
				closeFDs(fds)
				return fmt.Errorf("kick fd: %w", err)
			}
		}
		f = os.NewFile(uintptr(fds[0]), fmt.Sprintf("vring%d-%v", v&vringIndexMask, req))
	}
	index := int(v & vringIndexMask)
	switch req {
	case SetVringKick:
		r.stopKick()
		r.kick, r.kickSet = f, true
		if f == nil {
			c.log.Warn("vhost-user queue has no kick fd; it is only processed when the device starts", "queue", index)
		} else {
			r.kickDone = make(chan struct{})
			go c.kickLoop(index, f, r.kickDone)
		}
		c.tryStart()
	case SetVringCall:
		old := r.call
		r.call = f
		if r.q != nil {
			r.q.SetCall(f)
		}
		if old != nil {
			_ = old.Close()
		}
	case SetVringErr:
		if r.errFile != nil {
			_ = r.errFile.Close()
		}
		r.errFile = f
	}
	return nil
}

func (c *conn) kickLoop(index int, f *os.File, done chan<- struct{}) {
	defer close(done)
	var buf [8]byte
	for {
		if _, err := f.Read(buf[:]); err != nil {
			if !errors.Is(err, os.ErrClosed) {
				c.log.Warn("vhost-user kick fd failed", "queue", index, "err", err)
			}
			return
		}
		c.devMu.Lock()
		if c.running {
			c.dev.Kick(index)
		}
		c.devMu.Unlock()
	}
}

// stopKick closes the ring's kick fd and waits for its goroutine.
func (r *vring) stopKick() {
	if r.kick == nil {
		return
	}
	_ = r.kick.Close()
	<-r.kickDone
	r.kick, r.kickDone = nil, nil
}

func (c *conn) setVringEnable(p []byte) error {
	idx, num, err := parseVringState(SetVringEnable, p)
	if err != nil {
		return err
	}
	r, err := c.ring(idx)
	if err != nil {
		return err
	}
	if num > 1 {
		return protoErr("queue %d enable value %d", idx, num)
	}
	r.enabled = num == 1
	if !r.enabled && r.q != nil {
		c.stopDevice()
	}
	c.tryStart()
	return nil
}

func (c *conn) getConfig(p []byte) ([]byte, error) {
	h, _, err := parseConfig(GetConfig, p)
	if err != nil {
		return nil, err
	}
	cfg := c.dev.Config()
	if uint64(h.Offset)+uint64(h.Size) > uint64(len(cfg)) {
		// A zero-size reply tells the front-end the read failed.
		c.log.Warn("vhost-user GET_CONFIG out of range", "offset", h.Offset, "size", h.Size, "config_size", len(cfg))
		return AppendConfig(nil, ConfigHeader{Offset: h.Offset, Flags: h.Flags}, nil), nil
	}
	return AppendConfig(nil, h, cfg[h.Offset:h.Offset+h.Size]), nil
}

func (c *conn) isRunning() bool {
	c.devMu.Lock()
	defer c.devMu.Unlock()
	return c.running
}

// ringEnabled applies the vhost-user rule: with VHOST_USER_F_PROTOCOL_FEATURES
// negotiated rings start disabled until SET_VRING_ENABLE, without it they
// start enabled.
func (c *conn) ringEnabled(r *vring) bool {
	return r.enabled || c.acked&(1<<FeatureProtocolFeatures) == 0
}

// tryStart starts the device once every queue is fully set up.
func (c *conn) tryStart() {
	if c.isRunning() || c.mem == nil || !c.featuresSet {
		return
	}
	for _, r := range c.rings {
		if r.num == 0 || !r.addrSet || !r.kickSet || !c.ringEnabled(r) {
			return
		}
	}
	features := c.acked &^ (1 << FeatureProtocolFeatures)
	queues := make([]virtq.Queue, c.nq)
	for i, r := range c.rings {
		q, err := virtq.NewSplitQueue(c.mem, virtq.QueueConfig{Size: r.num, Addrs: r.addr, Features: features, LastAvail: r.base})
		if err != nil {
			c.log.Warn("vhost-user queue cannot start", "queue", i, "err", err)
			c.dropQueues()
			return
		}
		q.SetCall(r.call)
		r.q = q
		queues[i] = q
	}
	c.devMu.Lock()
	defer c.devMu.Unlock()
	if err := c.dev.Start(features, queues); err != nil {
		c.log.Warn("vhost-user device failed to start", "err", err)
		c.dropQueues()
		return
	}
	c.running = true
	// Buffers the driver made available before the start have no kick.
	for i := range c.rings {
		c.dev.Kick(i)
	}
}

func (c *conn) dropQueues() {
	for _, r := range c.rings {
		if r.q != nil {
			r.base = r.q.LastAvail()
			r.q = nil
		}
	}
}

// stopDevice stops the device if it runs, records where each ring stopped,
// and releases memory tables the device may have been using.
func (c *conn) stopDevice() {
	c.devMu.Lock()
	if c.running {
		c.dev.Stop()
		c.running = false
	}
	c.devMu.Unlock()
	c.dropQueues()
	for _, m := range c.retired {
		_ = m.Close()
	}
	c.retired = nil
}

// reset returns the connection to its state after SET_OWNER.
func (c *conn) reset() {
	c.stopDevice()
	for i, r := range c.rings {
		r.close()
		c.rings[i] = &vring{}
	}
	c.acked, c.featuresSet = 0, false
}

func (r *vring) close() {
	r.stopKick()
	for _, f := range []*os.File{r.call, r.errFile} {
		if f != nil {
			_ = f.Close()
		}
	}
	r.call, r.errFile = nil, nil
}

func (c *conn) teardown() {
	c.stopDevice()
	for _, r := range c.rings {
		r.close()
	}
	if c.mem != nil {
		_ = c.mem.Close()
		c.mem = nil
	}
	_ = c.uc.Close()
}
