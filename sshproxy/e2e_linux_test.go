package sshproxy

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"

	"github.com/vmharness/vmharness/harness/registry"
	"github.com/vmharness/vmharness/harness/sshkey"
)

// proxyMainEnv makes the test binary act as `vmharness ssh-proxy`, so the
// real ssh client can use it as its ProxyCommand.
const proxyMainEnv = "VMHARNESS_SSHPROXY_TEST_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(proxyMainEnv) == "1" {
		os.Exit(proxyMain(os.Args[1:]))
	}
	os.Exit(m.Run())
}

// proxyMain is the ssh-proxy subcommand reduced to what the test needs.
func proxyMain(args []string) int {
	if len(args) != 3 || args[0] != "ssh-proxy" {
		fmt.Fprintf(os.Stderr, "test proxy: bad arguments %q\n", args)
		return ExitFailure
	}
	port, err := ParsePort(args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return ExitFailure
	}
	p := Proxy{Stdin: os.Stdin, Stdout: os.Stdout}
	if reg, err := registry.Open(registry.RuntimeDir(os.Getenv)); err == nil {
		p.Dialer.Resolver = reg
	}
	if err := p.Run(context.Background(), args[1], port); err != nil {
		fmt.Fprintf(os.Stderr, "vmharness ssh-proxy: %v\n", err)
		return ExitFailure
	}
	return 0
}

// fakeSSHD serves the ssh protocol on connections a fake hybrid socket
// hands it: it accepts only key, and answers every exec request with
// "ran: CMD" and exit status 0.
func fakeSSHD(t *testing.T, authorized ssh.PublicKey) func(net.Conn) {
	_, hostPriv, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	hostKey, err := ssh.NewSignerFromKey(hostPriv)
	require.NoError(t, err)
	cfg := &ssh.ServerConfig{
		PublicKeyCallback: func(md ssh.ConnMetadata, key ssh.PublicKey) (*ssh.Permissions, error) {
			if md.User() == "root" && string(key.Marshal()) == string(authorized.Marshal()) {
				return nil, nil
			}
			return nil, fmt.Errorf("key not authorized for %s", md.User())
		},
	}
	cfg.AddHostKey(hostKey)
	return func(c net.Conn) {
		_, chans, reqs, err := ssh.NewServerConn(c, cfg)
		if err != nil {
			return
		}
		go ssh.DiscardRequests(reqs)
		for nc := range chans {
			if nc.ChannelType() != "session" {
				nc.Reject(ssh.UnknownChannelType, "only sessions")
				continue
			}
			ch, creqs, err := nc.Accept()
			if err != nil {
				return
			}
			go func() {
				defer ch.Close()
				for req := range creqs {
					if req.Type != "exec" {
						req.Reply(false, nil)
						continue
					}
					var payload struct{ Command string }
					if err := ssh.Unmarshal(req.Payload, &payload); err != nil {
						req.Reply(false, nil)
						return
					}
					req.Reply(true, nil)
					fmt.Fprintf(ch, "ran: %s\n", payload.Command)
					status := make([]byte, 4)
					binary.BigEndian.PutUint32(status, 0)
					ch.SendRequest("exit-status", false, status)
					return
				}
			}()
		}
	}
}

// TestRealSSHClient runs /usr/bin/ssh with the generated config against an
// ssh server behind a fake hybrid vsock socket, through every address form
// that reaches it.
func TestRealSSHClient(t *testing.T) {
	sshBin, err := exec.LookPath("ssh")
	if err != nil {
		t.Skip("OpenSSH client not installed")
	}
	state, err := shortTempDir(t)
	require.NoError(t, err)
	keyPath, pubLine, err := sshkey.EnsureKey(filepath.Join(state, "state"))
	require.NoError(t, err)
	authorized, _, _, _, err := ssh.ParseAuthorizedKey([]byte(pubLine))
	require.NoError(t, err)

	srv := startFakeHybrid(t, answerOK, fakeSSHD(t, authorized))

	runtime := filepath.Join(state, "run")
	reg, err := registry.Open(runtime)
	require.NoError(t, err)
	// This test process stands in for QEMU: it is alive for the test.
	r, err := reg.Register(registry.Entry{Name: "TEST-01-Basic", CID: 42, Transport: registry.TransportUser,
		HybridSocket: srv.Path, QEMUPID: os.Getpid()})
	require.NoError(t, err)
	defer r.Remove()

	self, err := os.Executable()
	require.NoError(t, err)
	cfgPath := filepath.Join(state, ConfigName)
	require.NoError(t, Config{Proxy: self, IdentityFile: keyPath}.WriteFile(cfgPath))

	for _, host := range []string{"vsock/42", "machine/TEST-01-Basic", "vsock-mux" + srv.Path} {
		t.Run(host, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, sshBin, "-F", cfgPath, "-o", "BatchMode=yes", host, "echo", "hi")
			cmd.Env = append(os.Environ(), proxyMainEnv+"=1", "VMHARNESS_RUNTIME_DIR="+runtime)
			out, err := cmd.CombinedOutput()
			require.NoError(t, err, "ssh output: %s", out)
			// LogLevel ERROR hides "Permanently added ... to the list of
			// known hosts", so the output is the command's alone.
			assert.Equal(t, "ran: echo hi\n", string(out))
		})
	}

	t.Run("unknown CID", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		start := time.Now()
		cmd := exec.CommandContext(ctx, sshBin, "-F", cfgPath, "-o", "BatchMode=yes", "vsock/17", "true")
		cmd.Env = append(os.Environ(), proxyMainEnv+"=1", "VMHARNESS_RUNTIME_DIR="+runtime)
		out, err := cmd.CombinedOutput()
		var exitErr *exec.ExitError
		require.ErrorAs(t, err, &exitErr)
		assert.Equal(t, 255, exitErr.ExitCode())
		assert.Contains(t, string(out), "vmharness ssh-proxy: vsock/17: no running harness VM has CID 17 (see vmharness ps)")
		assert.Less(t, time.Since(start), 5*time.Second)
	})
}

func TestConfigWrite(t *testing.T) {
	var b strings.Builder
	require.NoError(t, Config{Proxy: "/usr/bin/vmharness", IdentityFile: "/home/u/.local/state/vmharness/id_ed25519"}.Write(&b))
	var lines []string
	for _, l := range strings.Split(b.String(), "\n") {
		lines = append(lines, strings.TrimSpace(l))
	}
	for _, line := range []string{
		"Host vsock/* vsock-mux/* unix/* machine/* vsock%* vsock-mux%* unix%* machine%*",
		"ProxyCommand /usr/bin/vmharness ssh-proxy %n %p",
		"ProxyUseFdpass yes",
		"CheckHostIP no",
		"StrictHostKeyChecking no",
		"UserKnownHostsFile /dev/null",
		"LogLevel ERROR",
		"User root",
		"IdentityFile /home/u/.local/state/vmharness/id_ed25519",
		"IdentitiesOnly yes",
	} {
		assert.Contains(t, lines, line)
	}
	for _, bad := range []Config{
		{Proxy: "vmharness", IdentityFile: "/k"},
		{Proxy: "/a b/vmharness", IdentityFile: "/k"},
		{Proxy: "/vmharness", IdentityFile: "/100%/k"},
	} {
		assert.Error(t, bad.Write(&b), "%+v", bad)
	}
}
