package admission

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestDecide(t *testing.T) {
	// A 24 GiB host with 20 GiB available and the default reserve.
	host := func(s State) State {
		if s.MemTotalMiB == 0 {
			s.MemTotalMiB = 24576
		}
		if s.MemAvailableMiB == 0 {
			s.MemAvailableMiB = 20480
		}
		if s.ReserveMiB == 0 {
			s.ReserveMiB = DefaultReserveMiB
		}
		if s.WantMiB == 0 {
			s.WantMiB = 1024 + QEMUOverheadMiB
		}
		return s
	}
	tests := []struct {
		name      string
		state     State
		wantAdmit bool
		wantWhy   string
	}{
		{"nothing running", State{MaxVMs: 2}, true, ""},
		{"below the limit", State{MaxVMs: 2, Running: []int{1536}}, true, ""},
		{"at the limit", State{MaxVMs: 2, Running: []int{1536, 1536}}, false, ""},
		{"over the limit (the limit was lowered)", State{MaxVMs: 1, Running: []int{1536, 1536}}, false, ""},
		{"a run queued ahead goes first", State{MaxVMs: 2, Ahead: 1}, false, "1 queued ahead"},
		{"queued ahead and full", State{MaxVMs: 1, Running: []int{1536}, Ahead: 3}, false, "3 queued ahead"},
		{
			"admitted VMs' memory would exceed total less reserve",
			State{MaxVMs: 32, Running: []int{8192, 8192, 6144}},
			false, "memory: 22528 MiB for running VMs + 1536 MiB for this one > 24576 MiB total - 2048 MiB reserve",
		},
		{
			"too little available right now (other processes)",
			State{MaxVMs: 32, Running: []int{1536}, MemAvailableMiB: 3000},
			false, "memory: 3000 MiB available - 2048 MiB reserve < 1536 MiB for this VM",
		},
		{
			"a custom reserve",
			State{MaxVMs: 32, Running: []int{1536}, MemAvailableMiB: 3000, ReserveMiB: 1024},
			true, "",
		},
		{
			"alone, a VM is admitted even when memory looks short",
			State{MaxVMs: 2, MemAvailableMiB: 1000},
			true, "admitted with no other VM running although memory: 1000 MiB available",
		},
		{
			"alone, a VM bigger than the host is admitted",
			State{MaxVMs: 2, WantMiB: 65536},
			true, "admitted with no other VM running although memory: 0 MiB for running VMs + 65536 MiB",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := Decide(host(tt.state))
			assert.Equal(t, tt.wantAdmit, d.Admit)
			if tt.wantWhy == "" {
				assert.Empty(t, d.Why)
			} else {
				assert.True(t, strings.HasPrefix(d.Why, tt.wantWhy), "why: %q", d.Why)
			}
		})
	}
}

func TestConfigFromEnv(t *testing.T) {
	tests := []struct {
		name        string
		env         map[string]string
		ncpu        int
		wantMax     int
		wantFromEnv bool
		wantReserve int
		wantErr     string
	}{
		{"defaults, 2 CPUs", nil, 2, DefaultMaxVMs(2), false, DefaultReserveMiB, ""},
		{"defaults, 1 CPU", nil, 1, 1, false, DefaultReserveMiB, ""},
		{"VMHARNESS_MAX_VMS", map[string]string{MaxVMsEnv: "1"}, 8, 1, true, DefaultReserveMiB, ""},
		{"VMHARNESS_MAX_VMS above the CPUs", map[string]string{MaxVMsEnv: " 16 "}, 2, 16, true, DefaultReserveMiB, ""},
		{"reserve in MiB", map[string]string{ReserveEnv: "512"}, 2, DefaultMaxVMs(2), false, 512, ""},
		{"reserve in GiB", map[string]string{ReserveEnv: "4G"}, 2, DefaultMaxVMs(2), false, 4096, ""},
		{"reserve 1.5GiB", map[string]string{ReserveEnv: "1.5GiB"}, 2, DefaultMaxVMs(2), false, 1536, ""},
		{"no reserve", map[string]string{ReserveEnv: "0"}, 2, DefaultMaxVMs(2), false, 0, ""},
		{"zero VMs", map[string]string{MaxVMsEnv: "0"}, 2, 0, false, 0, "VMHARNESS_MAX_VMS=\"0\": want how many VMs may run at once"},
		{"not a number", map[string]string{MaxVMsEnv: "two"}, 2, 0, false, 0, "VMHARNESS_MAX_VMS=\"two\""},
		{"bad reserve", map[string]string{ReserveEnv: "lots"}, 2, 0, false, 0, "VMHARNESS_MEMORY_RESERVE=\"lots\": want a memory size"},
		{"negative reserve", map[string]string{ReserveEnv: "-1G"}, 2, 0, false, 0, "VMHARNESS_MEMORY_RESERVE"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ConfigFromEnv(func(k string) string { return tt.env[k] }, "/run/x", tt.ncpu)
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, "/run/x", cfg.Dir)
			assert.Equal(t, tt.wantMax, cfg.MaxVMs)
			assert.Equal(t, tt.wantFromEnv, cfg.MaxVMsFromEnv)
			assert.Equal(t, tt.wantReserve, cfg.ReserveMiB)
		})
	}
}

func TestParseMemInfo(t *testing.T) {
	m, err := parseMemInfo(strings.NewReader("MemTotal:       24684084 kB\nMemFree:         1000 kB\nMemAvailable:   21669848 kB\n"))
	require.NoError(t, err)
	assert.Equal(t, MemInfo{TotalMiB: 24105, AvailableMiB: 21161}, m)
	_, err = parseMemInfo(strings.NewReader("MemTotal: 1 kB\n"))
	assert.ErrorContains(t, err, "no MemTotal or MemAvailable")
}
