package vsockdev

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vmharness/vmharness/harness/virtq"
)

// forEachBackend runs f once through the vhost-user test driver and once
// over the fake queues.
func forEachBackend(t *testing.T, f func(t *testing.T, b backend)) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { f(t, b) })
	}
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestDeviceIdentity(t *testing.T) {
	d := New(Config{GuestCID: 0x1122334455})
	assert.Equal(t, uint64(1<<32), d.Features(), "VIRTIO_F_VERSION_1 and nothing else (no SEQPACKET)")
	assert.Equal(t, []byte{0x55, 0x44, 0x33, 0x22, 0x11, 0, 0, 0}, d.Config())
	assert.Equal(t, 2, d.NumQueues())
	assert.Error(t, d.Start(featureVersion1, nil))
	require.NoError(t, d.Close())
	assert.ErrorIs(t, d.Start(featureVersion1, []virtq.Queue{newFakeQueue(func() {}), newFakeQueue(func() {})}), ErrDeviceClosed)
}

func TestGuestConnectsToListener(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		checkGoroutines(t)
		e := b.new(t, Config{}, guestOptions{})
		l, err := e.dev.Listen(1000)
		require.NoError(t, err)
		assert.Equal(t, "2:1000", l.Addr().String())
		assert.Equal(t, "vsock", l.Addr().Network())
		_, err = e.dev.Listen(1000)
		assert.ErrorIs(t, err, syscall.EADDRINUSE)

		gs, err := e.g.Dial(1000)
		require.NoError(t, err)
		hc, err := l.Accept()
		require.NoError(t, err)
		assert.Equal(t, Addr{CID: 2, Port: 1000}, hc.LocalAddr())
		assert.Equal(t, Addr{CID: 3, Port: gs.local}, hc.RemoteAddr())

		// guest → host
		_, err = gs.Write([]byte("hello host"))
		require.NoError(t, err)
		buf := make([]byte, 64)
		n, err := io.ReadAtLeast(hc, buf, 10)
		require.NoError(t, err)
		assert.Equal(t, "hello host", string(buf[:n]))

		// host → guest
		_, err = hc.Write([]byte("hello guest"))
		require.NoError(t, err)
		n, err = io.ReadAtLeast(gs, buf, 11)
		require.NoError(t, err)
		assert.Equal(t, "hello guest", string(buf[:n]))

		// The guest closes: the host reads EOF and the guest gets
		// the RST it waits for.
		require.NoError(t, gs.Close())
		_, err = hc.Read(buf)
		assert.ErrorIs(t, err, io.EOF)
		require.NoError(t, hc.Close())
		assert.ErrorIs(t, hc.Close(), net.ErrClosed)
		require.NoError(t, l.Close())
		_, err = l.Accept()
		assert.ErrorIs(t, err, net.ErrClosed)
	})
}

func TestHostDialsGuest(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		checkGoroutines(t)
		e := b.new(t, Config{}, guestOptions{})
		accepted := e.g.Listen(22)
		hc, err := e.dev.Dial(testContext(t), 22)
		require.NoError(t, err)
		gs := <-accepted
		assert.Equal(t, uint32(22), gs.local)
		assert.Equal(t, Addr{CID: 2, Port: gs.remote}, hc.LocalAddr())
		assert.Equal(t, Addr{CID: 3, Port: 22}, hc.RemoteAddr())

		_, err = hc.Write([]byte("ping"))
		require.NoError(t, err)
		buf := make([]byte, 16)
		n, err := io.ReadAtLeast(gs, buf, 4)
		require.NoError(t, err)
		assert.Equal(t, "ping", string(buf[:n]))
		_, err = gs.Write([]byte("pong"))
		require.NoError(t, err)
		n, err = io.ReadAtLeast(hc, buf, 4)
		require.NoError(t, err)
		assert.Equal(t, "pong", string(buf[:n]))

		// The host closes: the guest reads EOF, and its RST ends the
		// host's connection.
		require.NoError(t, hc.Close())
		_, err = gs.Read(buf)
		assert.ErrorIs(t, err, io.EOF)
		require.Eventually(t, func() bool {
			e.dev.mu.Lock()
			defer e.dev.mu.Unlock()
			return len(e.dev.conns) == 0
		}, 5*time.Second, time.Millisecond, "the connection is forgotten after the guest's RST")
	})
}

func TestRefused(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		checkGoroutines(t)
		e := b.new(t, Config{}, guestOptions{})

		_, err := e.dev.Dial(testContext(t), 4444)
		require.ErrorIs(t, err, syscall.ECONNREFUSED, "nothing listens on guest port 4444")
		assert.Contains(t, err.Error(), "connection refused")

		_, err = e.g.Dial(5555)
		require.Error(t, err, "nothing listens on host port 5555")
		assert.Contains(t, err.Error(), "refused")
		assert.GreaterOrEqual(t, e.g.seen(OpRST), int64(1))

		// A Dial whose context ends first.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err = e.dev.Dial(ctx, 22)
		assert.ErrorIs(t, err, context.Canceled)
	})
}

func TestFallback(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		checkGoroutines(t)
		hostEnds := make(chan net.Conn, 1)
		cfg := Config{Fallback: func(ctx context.Context, port uint32) (net.Conn, error) {
			if port != 7000 {
				return nil, fmt.Errorf("no socket for port %d", port)
			}
			a, b := net.Pipe()
			hostEnds <- b
			return a, nil
		}}
		e := b.new(t, cfg, guestOptions{})

		_, err := e.g.Dial(7001)
		require.Error(t, err, "the fallback refuses port 7001")

		gs, err := e.g.Dial(7000)
		require.NoError(t, err)
		hostEnd := <-hostEnds
		_, err = gs.Write([]byte("through the fallback"))
		require.NoError(t, err)
		buf := make([]byte, 64)
		n, err := io.ReadAtLeast(hostEnd, buf, 20)
		require.NoError(t, err)
		assert.Equal(t, "through the fallback", string(buf[:n]))
		go hostEnd.Write([]byte("and back"))
		n, err = io.ReadAtLeast(gs, buf, 8)
		require.NoError(t, err)
		assert.Equal(t, "and back", string(buf[:n]))

		require.NoError(t, gs.Close())
		_, err = hostEnd.Read(buf)
		assert.ErrorIs(t, err, io.EOF, "the guest's close reaches the host socket")
		hostEnd.Close()
	})
}

// transfer sends size random bytes through w and checks they arrive intact
// at r. It returns the throughput.
func transfer(t *testing.T, w io.WriteCloser, r io.Reader, size int, closeWrite func() error) float64 {
	src := make([]byte, 1<<20)
	_, err := rand.Read(src)
	require.NoError(t, err)
	sent := sha256.New()
	start := time.Now()
	errc := make(chan error, 1)
	go func() {
		for n := 0; n < size; n += len(src) {
			chunk := src[:min(len(src), size-n)]
			if _, err := w.Write(chunk); err != nil {
				errc <- err
				return
			}
			sent.Write(chunk)
		}
		errc <- closeWrite()
	}()
	got := sha256.New()
	n, err := io.Copy(got, r)
	require.NoError(t, err)
	require.NoError(t, <-errc)
	elapsed := time.Since(start)
	require.Equal(t, int64(size), n)
	require.Equal(t, sent.Sum(nil), got.Sum(nil), "SHA-256 of the data")
	return float64(size) / elapsed.Seconds() / 1e6
}

func TestLargeTransfer(t *testing.T) {
	const size = 64 << 20
	forEachBackend(t, func(t *testing.T, b backend) {
		checkGoroutines(t)
		e := b.new(t, Config{}, guestOptions{})
		l, err := e.dev.Listen(1000)
		require.NoError(t, err)
		gs, err := e.g.Dial(1000)
		require.NoError(t, err)
		hc, err := l.Accept()
		require.NoError(t, err)

		mbps := transfer(t, gs, hc, size, gs.CloseWrite)
		t.Logf("guest→host: %.0f MB/s", mbps)
		mbps = transfer(t, hc, gs, size, hc.(*Conn).CloseWrite)
		t.Logf("host→guest: %.0f MB/s", mbps)
		require.NoError(t, hc.Close())
	})
}

func TestCreditExhaustion(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		checkGoroutines(t)
		t.Run("slow guest reader", func(t *testing.T) {
			// A small guest buffer and no unsolicited credit
			// updates: the device must stop at the credit, ask for
			// more with CREDIT_REQUEST and resume on the update.
			e := b.new(t, Config{}, guestOptions{bufAlloc: 8 << 10, lazyCredit: true})
			accepted := e.g.Listen(22)
			hc, err := e.dev.Dial(testContext(t), 22)
			require.NoError(t, err)
			gs := <-accepted
			data := make([]byte, 256<<10)
			rand.Read(data)
			go func() {
				hc.Write(data)
				hc.(*Conn).CloseWrite()
			}()
			var got []byte
			buf := make([]byte, 1000)
			for {
				time.Sleep(100 * time.Microsecond)
				n, err := gs.Read(buf)
				got = append(got, buf[:n]...)
				if err == io.EOF {
					break
				}
				require.NoError(t, err)
			}
			assert.Equal(t, data, got)
			assert.Greater(t, e.g.seen(OpCreditRequest), int64(0), "the device asked for credit")
			hc.Close()
		})
		t.Run("guest caps its credit", func(t *testing.T) {
			// The guest never uses more than 32 KiB of the host's
			// 1 MiB: the host must not wait for half its buffer
			// to be used before it sends credit updates.
			e := b.new(t, Config{BufferSize: 1 << 20}, guestOptions{bufAlloc: 32 << 10, capCredit: true})
			l, err := e.dev.Listen(1000)
			require.NoError(t, err)
			gs, err := e.g.Dial(1000)
			require.NoError(t, err)
			hc, err := l.Accept()
			require.NoError(t, err)
			// A stall would otherwise hang the test.
			require.NoError(t, hc.SetReadDeadline(time.Now().Add(20*time.Second)))
			transfer(t, gs, hc, 4<<20, gs.CloseWrite)
			hc.Close()
		})
		t.Run("slow host reader", func(t *testing.T) {
			e := b.new(t, Config{BufferSize: 16 << 10}, guestOptions{})
			l, err := e.dev.Listen(1000)
			require.NoError(t, err)
			gs, err := e.g.Dial(1000)
			require.NoError(t, err)
			hc, err := l.Accept()
			require.NoError(t, err)
			data := make([]byte, 512<<10)
			rand.Read(data)
			go func() {
				gs.Write(data)
				gs.CloseWrite()
			}()
			var got []byte
			buf := make([]byte, 3000)
			for {
				time.Sleep(100 * time.Microsecond)
				n, err := hc.Read(buf)
				got = append(got, buf[:n]...)
				if err == io.EOF {
					break
				}
				require.NoError(t, err)
			}
			assert.Equal(t, data, got)
			gs.mu.Lock()
			waits := gs.creditWaits
			gs.mu.Unlock()
			assert.Greater(t, waits, 0, "the guest ran out of credit and recovered")
			assert.Greater(t, e.g.seen(OpCreditUpdate), int64(0), "the device sent credit updates")
			hc.Close()
		})
	})
}

func TestManyConnections(t *testing.T) {
	const conns = 64
	const size = 256 << 10
	forEachBackend(t, func(t *testing.T, b backend) {
		checkGoroutines(t)
		e := b.new(t, Config{}, guestOptions{})
		l, err := e.dev.Listen(1000)
		require.NoError(t, err)
		accepted := e.g.Listen(22)

		var wg sync.WaitGroup
		errs := make(chan error, 4*conns)
		echo := func(c io.ReadWriteCloser, closeWrite func() error) {
			defer wg.Done()
			if _, err := io.Copy(c, c); err != nil {
				errs <- fmt.Errorf("echo: %w", err)
			}
			closeWrite()
		}
		check := func(c io.ReadWriter, closeWrite func() error, seed byte) {
			defer wg.Done()
			data := make([]byte, size)
			for i := range data {
				data[i] = seed + byte(i/7)
			}
			go func() {
				c.Write(data)
				closeWrite()
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				errs <- err
				return
			}
			if string(got) != string(data) {
				errs <- fmt.Errorf("connection %d: echoed data differs (%d of %d bytes)", seed, len(got), len(data))
			}
		}
		for i := range conns {
			wg.Add(2)
			if i%2 == 0 { // guest dials, host echoes
				go func() {
					gs, err := e.g.Dial(1000)
					if err != nil {
						errs <- err
						wg.Done()
						wg.Done()
						return
					}
					go check(gs, gs.CloseWrite, byte(i))
					hc, err := l.Accept()
					if err != nil {
						errs <- err
						wg.Done()
						return
					}
					echo(hc, hc.(*Conn).CloseWrite)
				}()
			} else { // host dials, guest echoes
				go func() {
					hc, err := e.dev.Dial(testContext(t), 22)
					if err != nil {
						errs <- err
						wg.Done()
						wg.Done()
						return
					}
					go check(hc, hc.(*Conn).CloseWrite, byte(i))
					gs := <-accepted
					echo(gs, gs.CloseWrite)
				}()
			}
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
}

func TestHalfClose(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		checkGoroutines(t)
		e := b.new(t, Config{}, guestOptions{})
		l, err := e.dev.Listen(1000)
		require.NoError(t, err)
		gs, err := e.g.Dial(1000)
		require.NoError(t, err)
		c, err := l.Accept()
		require.NoError(t, err)
		hc := c.(*Conn)
		buf := make([]byte, 64)

		// The guest stops sending; the host reads EOF but can still
		// send.
		_, err = gs.Write([]byte("request"))
		require.NoError(t, err)
		require.NoError(t, gs.CloseWrite())
		got, err := io.ReadAll(hc)
		require.NoError(t, err)
		assert.Equal(t, "request", string(got))
		_, err = hc.Write([]byte("response"))
		require.NoError(t, err)
		n, err := io.ReadAtLeast(gs, buf, 8)
		require.NoError(t, err)
		assert.Equal(t, "response", string(buf[:n]))

		// Now the host stops sending: the guest reads EOF, and writes
		// after CloseWrite fail.
		require.NoError(t, hc.CloseWrite())
		_, err = gs.Read(buf)
		assert.ErrorIs(t, err, io.EOF)
		_, err = hc.Write([]byte("late"))
		assert.ErrorIs(t, err, syscall.EPIPE)
		assert.Equal(t, int64(1), e.g.seen(OpShutdown), "one SHUTDOWN(SEND) from the host")

		require.NoError(t, gs.Close())
		require.NoError(t, hc.Close())
	})
}

func TestGuestShutdownReceive(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		e := b.new(t, Config{}, guestOptions{})
		l, err := e.dev.Listen(1000)
		require.NoError(t, err)
		gs, err := e.g.Dial(1000)
		require.NoError(t, err)
		hc, err := l.Accept()
		require.NoError(t, err)
		require.NoError(t, gs.sendCtrl(OpShutdown, ShutdownRcv))
		assert.Eventually(t, func() bool {
			_, err := hc.Write([]byte("x"))
			return errors.Is(err, syscall.EPIPE)
		}, 5*time.Second, time.Millisecond, "writes fail once the guest will not receive")
	})
}

func TestStopMidTransfer(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		checkGoroutines(t)
		e := b.new(t, Config{}, guestOptions{})
		l, err := e.dev.Listen(1000)
		require.NoError(t, err)
		accepted := e.g.Listen(22)

		gs, err := e.g.Dial(1000)
		require.NoError(t, err)
		in, err := l.Accept()
		require.NoError(t, err)
		out, err := e.dev.Dial(testContext(t), 22)
		require.NoError(t, err)
		<-accepted

		// Traffic in both directions, then the front-end goes away.
		go gs.Write(make([]byte, 8<<20))
		readErr := make(chan error, 1)
		go func() {
			_, err := io.Copy(io.Discard, in)
			readErr <- err
		}()
		writeErr := make(chan error, 1)
		go func() {
			buf := make([]byte, 64<<10)
			for {
				if _, err := out.Write(buf); err != nil {
					writeErr <- err
					return
				}
			}
		}()
		time.Sleep(50 * time.Millisecond)
		e.stop()
		assert.ErrorIs(t, <-readErr, ErrDeviceStopped)
		assert.ErrorIs(t, <-writeErr, ErrDeviceStopped)
		_, err = in.Write([]byte("x"))
		assert.ErrorIs(t, err, ErrDeviceStopped)
		in.Close()
		out.Close()
		e.g.stop()

		// Listeners survive for the next Start; Dial waits for it.
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		_, err = e.dev.Dial(ctx, 22)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		require.NoError(t, l.Close())
	})
}

func TestCreditViolation(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		checkGoroutines(t)
		e := b.new(t, Config{BufferSize: 4096}, guestOptions{})
		l, err := e.dev.Listen(1000)
		require.NoError(t, err)
		gs, err := e.g.Dial(1000)
		require.NoError(t, err)
		hc, err := l.Accept()
		require.NoError(t, err)

		// Ignore the host's 4 KiB buffer.
		gs.mu.Lock()
		h := gs.header(OpRW, 0)
		gs.mu.Unlock()
		h.Len = 5000
		require.NoError(t, e.g.sendRaw(h, make([]byte, 5000)))

		require.NoError(t, gs.waitFor(func() bool { return gs.reset }, 5*time.Second), "the guest gets an RST")
		_, err = io.ReadAll(hc)
		assert.ErrorIs(t, err, syscall.ECONNRESET)
		assert.Contains(t, err.Error(), "credit")
		hc.Close()
	})
}

func TestMalformedPackets(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		var logged []string
		var mu sync.Mutex
		e := b.new(t, Config{Logf: func(f string, args ...any) {
			mu.Lock()
			logged = append(logged, fmt.Sprintf(f, args...))
			mu.Unlock()
		}}, guestOptions{})
		l, err := e.dev.Listen(1000)
		require.NoError(t, err)
		base := Header{SrcCID: 3, DstCID: HostCID, SrcPort: 9, DstPort: 1000, Type: TypeStream, Op: OpRequest}
		tests := []struct {
			name    string
			chain   func() [][]byte
			wantRST bool
		}{
			{"short header", func() [][]byte { return [][]byte{make([]byte, 20)} }, false},
			{"len beyond chain", func() [][]byte {
				h := base
				h.Op, h.Len = OpRW, 100
				return encodeChain(h, make([]byte, 50))
			}, false},
			{"spoofed cid", func() [][]byte {
				h := base
				h.SrcCID = 77
				return encodeChain(h, nil)
			}, false},
			{"seqpacket request", func() [][]byte {
				h := base
				h.Type = 2
				return encodeChain(h, nil)
			}, true},
			{"unknown op", func() [][]byte {
				h := base
				h.Op = 99
				return encodeChain(h, nil)
			}, true},
			{"data without connection", func() [][]byte {
				h := base
				h.Op, h.Len = OpRW, 3
				return encodeChain(h, []byte("abc"))
			}, true},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				before := e.g.rstsSeen(base.SrcPort)
				require.NoError(t, e.g.sendChain(tt.chain()))
				// A well-formed ping afterwards proves the device
				// is alive and has handled the bad packet.
				gs, err := e.g.Dial(1000)
				require.NoError(t, err)
				hc, err := l.Accept()
				require.NoError(t, err)
				hc.Close()
				gs.Close()
				// The device handles the queues in order, so an
				// RST for the bad packet came before the RESPONSE.
				if tt.wantRST {
					assert.Equal(t, before+1, e.g.rstsSeen(base.SrcPort))
				} else {
					assert.Equal(t, before, e.g.rstsSeen(base.SrcPort))
				}
			})
		}
		mu.Lock()
		defer mu.Unlock()
		assert.NotEmpty(t, logged)
	})
}

func encodeChain(h Header, payload []byte) [][]byte {
	b := make([]byte, HeaderLen)
	h.Encode(b)
	if len(payload) == 0 {
		return [][]byte{b}
	}
	return [][]byte{b, payload}
}

func TestDeadlines(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		checkGoroutines(t)
		e := b.new(t, Config{}, guestOptions{bufAlloc: 4096, lazyCredit: true})
		accepted := e.g.Listen(22)
		hc, err := e.dev.Dial(testContext(t), 22)
		require.NoError(t, err)
		gs := <-accepted

		require.NoError(t, hc.SetReadDeadline(time.Now().Add(20*time.Millisecond)))
		_, err = hc.Read(make([]byte, 10))
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
		var ne net.Error
		require.ErrorAs(t, err, &ne)
		assert.True(t, ne.Timeout())

		// Clearing the deadline makes Read wait again.
		require.NoError(t, hc.SetReadDeadline(time.Time{}))
		go gs.Write([]byte("late data"))
		buf := make([]byte, 10)
		n, err := io.ReadAtLeast(hc, buf, 9)
		require.NoError(t, err)
		assert.Equal(t, "late data", string(buf[:n]))

		// The guest reads nothing and grants 4 KiB: the send buffer
		// fills and Write times out.
		require.NoError(t, hc.SetWriteDeadline(time.Now().Add(50*time.Millisecond)))
		n, err = hc.Write(make([]byte, 1<<20))
		require.ErrorIs(t, err, os.ErrDeadlineExceeded)
		assert.Less(t, n, 1<<20)
		assert.Greater(t, n, 0)

		// A deadline in the past fails at once.
		require.NoError(t, hc.SetDeadline(time.Now().Add(-time.Second)))
		_, err = hc.Read(buf)
		assert.ErrorIs(t, err, os.ErrDeadlineExceeded)
		hc.Close()
	})
}

func TestDeviceClose(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backend) {
		checkGoroutines(t)
		blocked := make(chan struct{})
		e := b.new(t, Config{Fallback: func(ctx context.Context, port uint32) (net.Conn, error) {
			close(blocked)
			<-ctx.Done()
			return nil, ctx.Err()
		}}, guestOptions{})
		l, err := e.dev.Listen(1000)
		require.NoError(t, err)
		gs, err := e.g.Dial(1000)
		require.NoError(t, err)
		hc, err := l.Accept()
		require.NoError(t, err)
		go e.g.Dial(2000) // hangs in the fallback
		<-blocked

		require.NoError(t, e.dev.Close())
		require.NoError(t, gs.waitFor(func() bool { return gs.reset }, 5*time.Second), "the guest's connection is reset")
		_, err = hc.Read(make([]byte, 1))
		assert.ErrorIs(t, err, ErrDeviceClosed)
		_, err = l.Accept()
		assert.ErrorIs(t, err, net.ErrClosed)
		_, err = e.dev.Listen(1001)
		assert.ErrorIs(t, err, ErrDeviceClosed)
		_, err = e.dev.Dial(context.Background(), 22)
		assert.ErrorIs(t, err, ErrDeviceClosed)
		hc.Close()
	})
}

func TestRestart(t *testing.T) {
	checkGoroutines(t)
	// A guest reboot: the front-end stops the device and starts it
	// again with fresh queues. Listeners carry over.
	e := newFakeEnv(t, Config{}, guestOptions{})
	l, err := e.dev.Listen(1000)
	require.NoError(t, err)
	gs, err := e.g.Dial(1000)
	require.NoError(t, err)
	old, err := l.Accept()
	require.NoError(t, err)
	e.dev.Stop()
	e.g.stop()
	_, err = old.Read(make([]byte, 1))
	assert.ErrorIs(t, err, ErrDeviceStopped)
	_ = gs

	rx := newFakeQueue(func() { e.dev.Kick(rxQueue) })
	tx := newFakeQueue(func() { e.dev.Kick(txQueue) })
	require.NoError(t, e.dev.Start(featureVersion1, []virtq.Queue{rx, tx}))
	g := newGuest(t, rx, tx, guestOptions{cid: 3})
	gs, err = g.Dial(1000)
	require.NoError(t, err)
	hc, err := l.Accept()
	require.NoError(t, err)
	_, err = gs.Write([]byte("after reboot"))
	require.NoError(t, err)
	buf := make([]byte, 12)
	_, err = io.ReadFull(hc, buf)
	require.NoError(t, err)
	assert.Equal(t, "after reboot", string(buf))
	hc.Close()
	old.Close()
}

// TestBatchingAndPriority drives the queues synchronously: one Notify per
// round however many packets it handled, and control packets ahead of
// queued data.
func TestBatchingAndPriority(t *testing.T) {
	dev := New(Config{GuestCID: 3})
	defer dev.Close()
	rx, tx := newFakeQueue(func() {}), newFakeQueue(func() {})
	ln, err := dev.Listen(1000)
	require.NoError(t, err)
	hdr := func(op Op, src uint32) Header {
		return Header{SrcCID: 3, DstCID: HostCID, SrcPort: src, DstPort: 1000, Type: TypeStream, Op: op, BufAlloc: 1 << 20}
	}

	// Two connections, ten packets, one round.
	for _, src := range []uint32{5000, 5001} {
		tx.Add(encodeChain(hdr(OpRequest, src), nil), nil)
	}
	for range 8 {
		tx.Add(encodeChain(hdr(OpCreditUpdate, 6000), nil), nil) // no such connection: RST
	}
	more, err := dev.serveTx(tx)
	require.NoError(t, err)
	assert.False(t, more)
	assert.Equal(t, int64(1), tx.notifies.Load())
	for range 10 {
		rx.Add(nil, []int{HeaderLen + 4096})
	}
	_, err = dev.serveRx(rx)
	require.NoError(t, err)
	assert.Equal(t, int64(1), rx.notifies.Load())
	require.Len(t, rx.used, 10, "two RESPONSEs and eight RSTs")
	for len(rx.used) > 0 {
		<-rx.used
	}

	// Connection A has lots of data queued; B's credit request is
	// answered before A's data drains.
	a, err := ln.Accept()
	require.NoError(t, err)
	_, err = ln.Accept()
	require.NoError(t, err)
	_, err = a.Write(make([]byte, 100<<10))
	require.NoError(t, err)
	tx.Add(encodeChain(hdr(OpCreditRequest, 5001), nil), nil)
	_, err = dev.serveTx(tx)
	require.NoError(t, err)
	for range 3 {
		rx.Add(nil, []int{HeaderLen + 4096})
	}
	_, err = dev.serveRx(rx)
	require.NoError(t, err)
	require.Len(t, rx.used, 3)
	first, err := DecodeHeader((<-rx.used).written)
	require.NoError(t, err)
	assert.Equal(t, OpCreditUpdate, first.Op)
	assert.Equal(t, uint32(5001), first.DstPort)
	second, err := DecodeHeader((<-rx.used).written)
	require.NoError(t, err)
	assert.Equal(t, OpRW, second.Op)
	assert.Equal(t, uint32(4096), second.Len, "one rx buffer's worth")

	// With no rx buffers the owed packets wait, bounded, for the next
	// round.
	<-rx.used
	_, err = dev.serveRx(rx)
	require.NoError(t, err)
	assert.Empty(t, rx.used)
	rx.Add(nil, []int{HeaderLen + 4096})
	_, err = dev.serveRx(rx)
	require.NoError(t, err)
	assert.Len(t, rx.used, 1)
}
