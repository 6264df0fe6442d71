package admission

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// plenty is a host with memory to spare, so only the VM count limits.
func plenty() (MemInfo, error) { return MemInfo{TotalMiB: 1 << 20, AvailableMiB: 1 << 20}, nil }

func testConfig(t *testing.T, maxVMs int) Config {
	return Config{Dir: filepath.Join(t.TempDir(), "slots"), MaxVMs: maxVMs, MemInfo: plenty, Poll: 10 * time.Millisecond}
}

func tickets(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, ticketPrefix+"*"))
	require.NoError(t, err)
	return m
}

// TestAdmitLimitsConcurrency runs more goroutines than slots, each with
// its own ticket (and its own flock), and checks that never more than the
// limit hold a slot and that all get one in the order they queued.
func TestAdmitLimitsConcurrency(t *testing.T) {
	for _, limit := range []int{1, 2, 3} {
		t.Run(fmt.Sprintf("limit %d", limit), func(t *testing.T) {
			cfg := testConfig(t, limit)
			const runs = 7
			var running, peak atomic.Int32
			var mu sync.Mutex
			var order []int
			var wg sync.WaitGroup
			for i := range runs {
				// Queue one after the other, so the queue order is known.
				joined := make(chan struct{})
				wg.Add(1)
				go func() {
					defer wg.Done()
					var once sync.Once
					go func() { time.Sleep(50 * time.Millisecond); once.Do(func() { close(joined) }) }()
					s, err := Admit(context.Background(), cfg, Request{Name: strconv.Itoa(i), MemoryMiB: 1024}, func(Waiting) { once.Do(func() { close(joined) }) })
					once.Do(func() { close(joined) })
					if !assert.NoError(t, err) {
						return
					}
					n := running.Add(1)
					for {
						p := peak.Load()
						if n <= p || peak.CompareAndSwap(p, n) {
							break
						}
					}
					mu.Lock()
					order = append(order, i)
					mu.Unlock()
					time.Sleep(30 * time.Millisecond)
					running.Add(-1)
					s.Release()
				}()
				<-joined
			}
			wg.Wait()
			assert.LessOrEqual(t, int(peak.Load()), limit)
			assert.Equal(t, min(limit, runs), int(peak.Load()), "the limit is used")
			require.Len(t, order, runs)
			// First come, first served (the first `limit` start together).
			for i := limit; i < runs; i++ {
				assert.Equal(t, i, order[i], "admission order %v", order)
			}
			assert.Empty(t, tickets(t, cfg.Dir), "released tickets are gone")
		})
	}
}

func TestAdmitWaitsSaysSoOnceAndObeysContext(t *testing.T) {
	cfg := testConfig(t, 1)
	first, err := Admit(context.Background(), cfg, Request{Name: "first", MemoryMiB: 1024}, func(Waiting) { t.Error("the first run waited") })
	require.NoError(t, err)
	assert.Zero(t, first.Note)

	ctx, cancel := context.WithCancelCause(context.Background())
	var calls []Waiting
	done := make(chan error)
	go func() {
		_, err := Admit(ctx, cfg, Request{Name: "second", MemoryMiB: 1024}, func(w Waiting) { calls = append(calls, w) })
		done <- err
	}()
	time.Sleep(200 * time.Millisecond)
	require.Len(t, tickets(t, cfg.Dir), 2)
	cancel(errors.New("terminated"))
	err = <-done
	require.Error(t, err)
	assert.Equal(t, "while waiting for a VM slot (1 running, limit 1): terminated", err.Error())
	assert.Equal(t, []Waiting{{Running: 1, MaxVMs: 1}}, calls, "said once")
	assert.Len(t, tickets(t, cfg.Dir), 1, "the cancelled run's ticket is gone")

	first.Release()
	first.Release()
	s, err := Admit(context.Background(), cfg, Request{Name: "third", MemoryMiB: 1024}, nil)
	require.NoError(t, err)
	assert.Less(t, s.Waited, time.Second)
	s.Release()
}

func TestAdmitMemory(t *testing.T) {
	cfg := testConfig(t, 8)
	avail := 8192
	cfg.MemInfo = func() (MemInfo, error) { return MemInfo{TotalMiB: 8192, AvailableMiB: avail}, nil }
	cfg.ReserveMiB = 2048
	// 8192 - 2048 = 6144 MiB for VMs of 2048+512: two fit, a third waits.
	var slots []*Slot
	for range 2 {
		s, err := Admit(context.Background(), cfg, Request{MemoryMiB: 2048}, func(Waiting) { t.Error("waited") })
		require.NoError(t, err)
		slots = append(slots, s)
	}
	got := make(chan Waiting, 1)
	admitted := make(chan *Slot)
	go func() {
		s, err := Admit(context.Background(), cfg, Request{MemoryMiB: 2048}, func(w Waiting) { got <- w })
		assert.NoError(t, err)
		admitted <- s
	}()
	w := <-got
	assert.Equal(t, 2, w.Running)
	assert.Contains(t, w.Why, "memory: 5120 MiB for running VMs + 2560 MiB for this one > 8192 MiB total - 2048 MiB reserve")
	slots[0].Release()
	s := <-admitted
	s.Release()
	slots[1].Release()
}

// TestAdmitAcrossProcesses holds slots in other processes (this test
// binary re-executed as a helper): a run waits while they hold them, and
// a holder killed with SIGKILL frees its slot without cleaning up.
func TestAdmitAcrossProcesses(t *testing.T) {
	cfg := testConfig(t, 2)
	var holders []*exec.Cmd
	for range 2 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperHoldSlot$")
		cmd.Env = append(os.Environ(), "ADMISSION_HELPER_DIR="+cfg.Dir)
		out, err := cmd.StdoutPipe()
		require.NoError(t, err)
		require.NoError(t, cmd.Start())
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		line, err := bufio.NewReader(out).ReadString('\n')
		require.NoError(t, err)
		require.Equal(t, "admitted\n", line)
		holders = append(holders, cmd)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	var waited Waiting
	_, err := Admit(ctx, cfg, Request{MemoryMiB: 1024}, func(w Waiting) { waited = w })
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Equal(t, Waiting{Running: 2, MaxVMs: 2}, waited)

	require.NoError(t, holders[0].Process.Signal(syscall.SIGKILL))
	holders[0].Wait()
	s, err := Admit(context.Background(), cfg, Request{MemoryMiB: 1024}, func(Waiting) { t.Error("waited after a holder died") })
	require.NoError(t, err)
	assert.Len(t, tickets(t, cfg.Dir), 2, "the dead holder's ticket was removed")
	s.Release()
}

// TestHelperHoldSlot is the helper process of TestAdmitAcrossProcesses.
func TestHelperHoldSlot(t *testing.T) {
	dir := os.Getenv("ADMISSION_HELPER_DIR")
	if dir == "" {
		t.Skip("helper process")
	}
	cfg := Config{Dir: dir, MaxVMs: 2, MemInfo: plenty, Poll: 10 * time.Millisecond}
	s, err := Admit(context.Background(), cfg, Request{Name: "helper", MemoryMiB: 1024}, nil)
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	fmt.Println("admitted")
	time.Sleep(time.Minute)
	s.Release()
}
