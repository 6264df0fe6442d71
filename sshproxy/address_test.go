package sshproxy

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseAddress(t *testing.T) {
	tests := []struct {
		host    string
		want    Address
		wantErr string
	}{
		{host: "vsock/3", want: Address{Kind: KindVsock, CID: 3}},
		{host: "vsock/4294967294", want: Address{Kind: KindVsock, CID: 4294967294}},
		{host: "vsock-mux/run/vm/vsock.sock", want: Address{Kind: KindVsockMux, Path: "/run/vm/vsock.sock"}},
		{host: "vsock-mux//run/vm/vsock.sock", want: Address{Kind: KindVsockMux, Path: "/run/vm/vsock.sock"}},
		{host: "unix/tmp/sshd.sock", want: Address{Kind: KindUnix, Path: "/tmp/sshd.sock"}},
		{host: "unix/./sshd.sock", want: Address{Kind: KindUnix, Path: "./sshd.sock"}},
		{host: "unix/Tmp/A B", want: Address{Kind: KindUnix, Path: "/Tmp/A B"}},
		{host: "machine/TEST-01-BASIC", want: Address{Kind: KindMachine, Name: "TEST-01-BASIC"}},
		// The '%' forms scp can use.
		{host: "vsock%3", want: Address{Kind: KindVsock, CID: 3}},
		{host: "unix%/tmp/sshd.sock", want: Address{Kind: KindUnix, Path: "/tmp/sshd.sock"}},
		{host: "vsock-mux%/run/vm/vsock.sock", want: Address{Kind: KindVsockMux, Path: "/run/vm/vsock.sock"}},
		{host: "machine%boot", want: Address{Kind: KindMachine, Name: "boot"}},
		{host: "vsock%", wantErr: "not a number"},

		{host: "vsock/2", wantErr: "not a guest CID"},
		{host: "vsock/0", wantErr: "not a guest CID"},
		{host: "vsock/4294967295", wantErr: "not a guest CID"},
		{host: "vsock/4294967296", wantErr: "not a number"},
		{host: "vsock/-1", wantErr: "not a number"},
		{host: "vsock/abc", wantErr: "not a number"},
		{host: "vsock/", wantErr: "not a number"},
		{host: "vsock-mux/", wantErr: "missing socket path"},
		{host: "unix//", wantErr: "missing socket path"},
		{host: "machine/", wantErr: "not a VM name"},
		{host: "machine/a/b", wantErr: "not a VM name"},
		{host: "tcp/1.2.3.4", wantErr: `unknown kind "tcp"`},
		{host: "localhost", wantErr: "not a vmharness address"},
		{host: "", wantErr: "not a vmharness address"},
	}
	for _, tt := range tests {
		t.Run(tt.host, func(t *testing.T) {
			got, err := ParseAddress(tt.host)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
			// String round-trips through ParseAddress.
			again, err := ParseAddress(got.String())
			require.NoError(t, err)
			assert.Equal(t, got, again)
		})
	}
}

func TestParsePort(t *testing.T) {
	tests := []struct {
		in      string
		want    uint32
		wantErr bool
	}{
		{"", 22, false},
		{"22", 22, false},
		{"2222", 2222, false},
		{"0", 0, true},
		{"ssh", 0, true},
		{"-1", 0, true},
	}
	for _, tt := range tests {
		got, err := ParsePort(tt.in)
		if tt.wantErr {
			assert.Error(t, err, tt.in)
			continue
		}
		require.NoError(t, err, tt.in)
		assert.Equal(t, tt.want, got, tt.in)
	}
}
