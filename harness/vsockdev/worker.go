package vsockdev

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"

	"github.com/vmharness/vmharness/harness/virtq"
)

// run serves both queues until w.stop is closed or a queue breaks. One
// goroutine drives both queues, so neither needs locking, and a packet's
// reply (RESPONSE, RST, CREDIT_UPDATE) is queued before the next round of
// rx processing.
func (d *Device) run(w *worker) {
	defer close(w.done)
	for {
		select {
		case <-w.stop:
			return
		case <-d.wake:
		}
		for {
			moreTx, err := d.serveTx(w.tx)
			var moreRx bool
			if err == nil {
				moreRx, err = d.serveRx(w.rx)
			}
			if err != nil {
				d.queuesFailed(err)
				return
			}
			if !moreTx && !moreRx {
				break
			}
			select {
			case <-w.stop:
				return
			default:
			}
		}
	}
}

// queuesFailed handles a ring the guest corrupted: the device cannot go on
// until the front-end restarts it.
func (d *Device) queuesFailed(err error) {
	d.logf("vsock: %v; the device stops serving its queues until it is restarted", err)
	d.mu.Lock()
	d.failed = err
	d.mu.Unlock()
	d.failAll(err)
}

// serveTx handles up to roundBatch packets from the guest and reports
// whether more may be waiting.
func (d *Device) serveTx(q virtq.Queue) (more bool, err error) {
	n := 0
	defer func() {
		if n > 0 {
			if nerr := q.Notify(); nerr != nil && err == nil {
				err = fmt.Errorf("vsock tx queue: notify: %w", nerr)
			}
		}
	}()
	for ; n < roundBatch; n++ {
		ch, err := q.Next()
		if err != nil {
			return false, fmt.Errorf("vsock tx queue: %w", err)
		}
		if ch == nil {
			return false, nil
		}
		d.handleTx(ch)
		if err := q.Complete(ch, 0); err != nil {
			return false, fmt.Errorf("vsock tx queue: complete: %w", err)
		}
	}
	return true, nil
}

// payload is a packet's data as it lies in the chain's readable buffers:
// the rest of one buffer, then whole buffers.
type payload struct {
	first []byte
	rest  [][]byte
}

// handleTx processes one packet from the guest.
func (d *Device) handleTx(ch *virtq.Chain) {
	var raw [HeaderLen]byte
	idx, off, ok := gather(ch.Readable, raw[:])
	if !ok {
		d.logf("vsock: dropped a %d byte tx chain: shorter than a packet header", ch.ReadableLen())
		return
	}
	h, _ := DecodeHeader(raw[:])
	switch v, why := checkTx(&h, d.cfg.GuestCID, ch.ReadableLen()-HeaderLen); v {
	case drop:
		d.logPacket(h, "dropped", "%s", why)
		return
	case reset:
		d.logPacket(h, "reset", "%s", why)
		d.mu.Lock()
		if h.Op != OpRST {
			d.queueRSTLocked(&h)
		}
		d.mu.Unlock()
		return
	}
	var p payload
	if idx < len(ch.Readable) {
		p.first = ch.Readable[idx][off:]
		p.rest = ch.Readable[idx+1:]
	}

	key := connKey{host: h.DstPort, guest: h.SrcPort}
	d.mu.Lock()
	c := d.conns[key]
	if c == nil {
		switch h.Op {
		case OpRequest:
			d.acceptLocked(&h, key)
		case OpRST:
			// Nothing to reset; answering would start an RST ping-pong.
		default:
			d.queueRSTLocked(&h)
		}
		d.mu.Unlock()
		return
	}
	d.mu.Unlock()
	c.mu.Lock()
	c.handle(&h, p)
	c.mu.Unlock()
}

// acceptLocked answers a guest's connection request; d.mu is held.
func (d *Device) acceptLocked(h *Header, key connKey) {
	if d.closed || len(d.conns) >= d.cfg.MaxConns {
		d.logPacket(*h, "reset", "device closed or %d connections open", len(d.conns))
		d.queueRSTLocked(h)
		return
	}
	l := d.listeners[h.DstPort]
	if l == nil && d.cfg.Fallback == nil {
		d.queueRSTLocked(h)
		return
	}
	c := d.newConnLocked(key)
	c.peerBufAlloc, c.peerFwdCnt = h.BufAlloc, h.FwdCnt
	if l == nil {
		c.state = stateAccepting
		d.wg.Add(1)
		go d.fallback(c, h.DstPort)
		return
	}
	c.state = stateEstablished
	c.needResponse = true
	select {
	case l.accept <- c:
		d.scheduleLocked(c, true)
	default:
		delete(d.conns, key)
		d.logPacket(*h, "reset", "the listener's backlog is full")
		d.queueRSTLocked(h)
	}
}

// fallback serves a guest connection to a port nobody listens on through
// cfg.Fallback.
func (d *Device) fallback(c *Conn, port uint32) {
	defer d.wg.Done()
	fc, err := d.cfg.Fallback(d.ctx, port)
	c.mu.Lock()
	if err != nil {
		d.logf("vsock: refused the guest's connection from port %d to host port %d: %v", c.key.guest, port, err)
		c.resetLocked(syscall.ECONNREFUSED)
		c.mu.Unlock()
		return
	}
	if c.state != stateAccepting || c.removed || c.needRST || c.err != nil {
		c.mu.Unlock()
		fc.Close()
		return
	}
	c.state = stateEstablished
	c.needResponse = true
	c.schedule(true)
	c.mu.Unlock()
	proxy(c, fc)
}

// proxy copies between a guest connection and a host one until both
// directions are done or either side fails, then closes both.
func proxy(c *Conn, fc net.Conn) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if _, err := io.Copy(fc, c); err == nil {
			// The guest finished sending; keep the host socket
			// open for the other direction until the vsock side
			// is gone.
			closeWrite(fc)
			<-c.dead
		}
		fc.Close()
	}()
	if _, err := io.Copy(c, fc); err == nil || errors.Is(err, io.EOF) {
		c.CloseWrite()
	} else {
		c.Close()
	}
	wg.Wait()
	c.Close()
	fc.Close()
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// serveRx fills guest rx buffers with what the host owes the guest: first
// RSTs for stray packets, then control packets, then data, one packet per
// connection in turn. It reports whether it stopped at the batch limit.
func (d *Device) serveRx(q virtq.Queue) (more bool, err error) {
	n := 0
	defer func() {
		if n > 0 {
			if nerr := q.Notify(); nerr != nil && err == nil {
				err = fmt.Errorf("vsock rx queue: notify: %w", nerr)
			}
		}
		d.mu.Lock()
		if d.flushed != nil && d.ctrlq.len() == 0 && len(d.rsts) == 0 {
			close(d.flushed)
			d.flushed = nil
		}
		d.mu.Unlock()
	}()
	for n < roundBatch {
		d.mu.Lock()
		if len(d.rsts) > 0 {
			h := d.rsts[0]
			d.mu.Unlock()
			ch, err := d.nextRx(q, &n)
			if ch == nil || err != nil {
				return false, err
			}
			d.mu.Lock()
			d.rsts = d.rsts[1:]
			d.mu.Unlock()
			if err := q.Complete(ch, writePacket(ch, &h, nil, nil)); err != nil {
				return false, fmt.Errorf("vsock rx queue: complete: %w", err)
			}
			n++
			continue
		}
		ctrl := true
		c := d.ctrlq.pop()
		if c != nil {
			c.inCtrl = false
		} else if c = d.dataq.pop(); c != nil {
			c.inData = false
			ctrl = false
		}
		d.mu.Unlock()
		if c == nil {
			return false, nil
		}

		c.mu.Lock()
		op := c.plan(ctrl)
		if op == OpInvalid {
			c.mu.Unlock()
			continue
		}
		ch, err := d.nextRx(q, &n)
		if ch == nil || err != nil {
			d.mu.Lock()
			if ctrl && !c.inCtrl {
				c.inCtrl = true
				d.ctrlq.pushFront(c)
			} else if !ctrl && !c.inData {
				c.inData = true
				d.dataq.pushFront(c)
			}
			d.mu.Unlock()
			c.mu.Unlock()
			return false, err
		}
		written := c.emit(op, ch)
		if c.plan(ctrl) != OpInvalid {
			c.schedule(ctrl)
		}
		c.mu.Unlock()
		if err := q.Complete(ch, written); err != nil {
			return false, fmt.Errorf("vsock rx queue: complete: %w", err)
		}
		n++
	}
	return true, nil
}

// nextRx returns the next guest rx buffer big enough for a header, or nil
// if the guest has none. Smaller ones are returned unused; *used counts
// them.
func (d *Device) nextRx(q virtq.Queue, used *int) (*virtq.Chain, error) {
	for {
		ch, err := q.Next()
		if err != nil {
			return nil, fmt.Errorf("vsock rx queue: %w", err)
		}
		if ch == nil || ch.WritableLen() >= HeaderLen {
			return ch, nil
		}
		d.logf("vsock: returned a %d byte rx buffer unused: too small for a packet header", ch.WritableLen())
		if err := q.Complete(ch, 0); err != nil {
			return nil, fmt.Errorf("vsock rx queue: complete: %w", err)
		}
		*used++
	}
}

// writePacket stores header h and payload a, b into the chain's writable
// buffers and returns the bytes written.
func writePacket(ch *virtq.Chain, h *Header, a, b []byte) uint32 {
	var raw [HeaderLen]byte
	h.Encode(raw[:])
	s := scatter{bufs: ch.Writable}
	s.write(raw[:])
	s.write(a)
	s.write(b)
	return uint32(s.n)
}
