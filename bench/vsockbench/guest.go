package main

import (
	"fmt"
	"strings"
)

// The guest side of the benchmark is one oneshot service running a shell
// script. The script travels as a system credential (not in the unit text)
// so it needs no escaping of systemd's specifiers and variables.
const (
	unitName       = "vsockbench.service"
	scriptCredName = "vsockbench.sh"
)

// Ports. Host ports (CID 2) are private to this VM with the userspace
// transport; guest ports are the guest's own.
const (
	ctlPort     = 5000 // host: the guest's control requests, one per connection
	g2hPort     = 5001 // host: guest→host stream, vsock listener in this process
	g2hUnixPort = 5002 // host: guest→host stream, through the transport's Unix socket fallback
	g2hParPort  = 5003 // host: guest→host parallel streams, vsock listener in this process
	h2gPort     = 6001 // guest: host→guest stream, host Dials
	h2gHybPort  = 6002 // guest: host→guest stream, host CONNECTs through the hybrid socket
	latencyPort = 6003 // guest: accept-and-close loop for the connection latency
)

// The journal spans: lines logged through systemd-cat go to the journal
// only; the unit's own stdout goes to the journal and, by the harness's
// drop-in (StandardOutput=journal+console), to the serial console too.
const (
	spanJournal   = "JOURNAL"
	spanConsole   = "CONSOLE"
	journalPrefix = "bench-journal "
	consolePrefix = "bench-console "
)

// unitText is the test unit. Journald must not rate-limit the journal
// phase: LogRateLimitIntervalSec=0 did not stop it (journald kept exactly
// its default burst of 10000 lines and dropped the rest when the guest
// logged 1000 lines/s), so the unit sets a burst no run reaches instead.
// The default start timeout would cut a slow run short.
const unitText = `[Unit]
Description=vsockbench: guest side of the vsock and journal benchmarks

[Service]
Type=oneshot
LoadCredential=` + scriptCredName + `
ExecStart=/bin/sh %d/` + scriptCredName + `
LogRateLimitIntervalSec=1s
LogRateLimitBurst=1000000000
TimeoutStartSec=infinity
`

// guestParams are the sizes the guest script uses.
type guestParams struct {
	Bytes        int64 // per throughput phase
	BlockSize    int   // socat's and the sink's read/write size
	Lines        int   // journal lines through systemd-cat
	ConsoleLines int   // journal lines on the unit's stdout (journal+console)
	LineLen      int   // bytes per journal line, without the newline
	Repeat       int   // runs of each throughput phase
	SenderBuffer int64 // the big-buffer sender's vsock socket buffer
	Streams      int   // connections of the parallel guest→host phase
}

// journalLinePad is the filler that makes each journal line LineLen bytes:
// the prefix and a 6-digit sequence number and a blank come first.
func (p guestParams) journalLinePad() string {
	n := p.LineLen - len(journalPrefix) - 7
	if n < 1 {
		n = 1
	}
	return strings.Repeat("x", n)
}

// guestScript returns the script the test unit runs. Each phase is
// bracketed by control requests (ctl), which the host answers only once its
// side of the phase is done, so the phases never overlap.
func guestScript(p guestParams) string {
	jb, je := spanMarkers(spanJournal)
	cb, ce := spanMarkers(spanConsole)
	return fmt.Sprintf(`set -eu
N=%d
B=%d
LINES=%d
PAD=%s
CTL=%d

# ctl sends one request line to the host and prints its one-line answer.
# -t: after sending, wait for the answer (the host may take minutes). A
# connect that times out (the kernel gives up after 2 s) is retried; the
# host counts the requests that never came.
ctl() {
	for try in 1 2 3 4 5; do
		if printf '%%s\n' "$*" | socat -t 3600 - "VSOCK-CONNECT:2:$CTL"; then
			return 0
		fi
		echo "vsockbench: control request '$*' failed (try $try)" >&2
		sleep 1
	done
	return 1
}
ns() { date +%%s%%N; }

# Perl (perl-base is essential) stands in where socat cannot help: a
# sender that writes one buffer over and over (what iperf does: no source
# to read, so the guest's time goes to the socket), a sink that counts
# what it received, and an accept loop that spawns nothing per
# connection. AF_VSOCK is 40; struct sockaddr_vm is family, reserved,
# port, cid, flags, 3 zero bytes. The sender's optional last argument is
# the socket's buffer size (SO_VM_SOCKETS_BUFFER_MAX_SIZE, then
# SO_VM_SOCKETS_BUFFER_SIZE: options 2 and 0 of level AF_VSOCK, u64):
# Linux lets no more data be in flight than its own buffer, 256 KiB by
# default, whatever the host offers.
cat >/run/vsockbench.pl <<'EOF'
use strict;
my ($mode, $port, $bs, $n, $sockbuf) = @ARGV;
socket(my $s, 40, 1, 0) or die "socket: $!";
if ($mode eq "send") {
	if ($sockbuf) {
		setsockopt($s, 40, 2, pack("Q", $sockbuf)) or die "SO_VM_SOCKETS_BUFFER_MAX_SIZE: $!";
		setsockopt($s, 40, 0, pack("Q", $sockbuf)) or die "SO_VM_SOCKETS_BUFFER_SIZE: $!";
	}
	connect($s, pack("SSLLCx3", 40, 0, $port, 2, 0)) or die "connect to host port $port: $!";
	my $buf = "\0" x $bs;
	while ($n > 0) {
		my $w = syswrite($s, $buf, $n < $bs ? $n : $bs);
		defined $w or die "write: $!";
		$n -= $w;
	}
	close $s or die "close: $!";
	exit 0;
}
bind($s, pack("SSLLCx3", 40, 0, $port, 0xFFFFFFFF, 0)) or die "bind port $port: $!";
listen($s, 128) or die "listen: $!";
alarm 900;
if ($mode eq "count") {
	accept(my $c, $s) or die "accept: $!";
	my ($total, $n, $buf) = (0);
	$total += $n while ($n = sysread($c, $buf, $bs)) > 0;
	defined $n or die "read: $!";
	close $c;
	print "$total\n";
} else {
	while (accept(my $c, $s)) { close $c }
}
EOF

# settle waits (at most a minute) until the guest has been at least 90%%
# idle for two seconds in a row: streams started right after boot ran at
# a third of the later rate while the booted system was still busy.
settle() {
	quiet=0 waited=0
	while [ "$quiet" -lt 2 ] && [ "$waited" -lt 60 ]; do
		set -- $(head -n1 /proc/stat)
		busy0=$(($2 + $3 + $4 + $7 + $8 + $9)) idle0=$(($5 + $6))
		sleep 1
		set -- $(head -n1 /proc/stat)
		busy=$(($2 + $3 + $4 + $7 + $8 + $9 - busy0)) idle=$(($5 + $6 - idle0))
		if [ $((idle * 10)) -ge $(((busy + idle) * 9)) ]; then quiet=$((quiet + 1)); else quiet=0; fi
		waited=$((waited + 1))
	done
	echo "$waited"
}

ctl hello >/dev/null
ctl "settled $(settle)" >/dev/null

# Baseline: socat moving the same bytes without vsock, so the guest's own
# cost of reading /dev/zero shows.
t0=$(ns)
socat -u -b "$B" "OPEN:/dev/zero,readbytes=$N" OPEN:/dev/null
t1=$(ns)
ctl "baseline $((t1 - t0))" >/dev/null

for run in $(seq %d); do
	for kind in write write-bigbuf parallel socat unix; do
		t0=$(ns)
		case $kind in
		write) perl /run/vsockbench.pl send %d "$B" "$N" ;;
		write-bigbuf) perl /run/vsockbench.pl send %d "$B" "$N" %d ;;
		parallel)
			# S senders share the N bytes; the first takes the remainder.
			S=%d pids=""
			for i in $(seq "$S"); do
				perl /run/vsockbench.pl send %d "$B" $((N / S + (i == 1 ? N %% S : 0))) &
				pids="$pids $!"
			done
			for pid in $pids; do wait "$pid"; done ;;
		socat) socat -u -b "$B" "OPEN:/dev/zero,readbytes=$N" "VSOCK-CONNECT:2:%d" ;;
		unix) perl /run/vsockbench.pl send %d "$B" "$N" ;;
		esac
		t1=$(ns)
		ctl "g2h-end $kind $((t1 - t0))" >/dev/null
	done
	for phase in "h2g %d" "h2g-hybrid %d"; do
		set -- $phase
		perl /run/vsockbench.pl count "$2" "$B" >/run/vsockbench.count &
		sink=$!
		ctl "$1 $2" >/dev/null
		wait "$sink"
		ctl "$1-count $(cat /run/vsockbench.count)" >/dev/null
	done
done

perl /run/vsockbench.pl accept %d &
acceptor=$!
ctl "latency %d" >/dev/null
kill "$acceptor"

# Journal only: systemd-cat's stream is not copied to the console. The
# guest's own time runs until journald has taken in every line.
t0=$(ns)
{
	echo %s
	seq -f "%s%%06.0f $PAD" 1 "$LINES"
	echo %s
} | systemd-cat -t vsockbench
journalctl --sync
t1=$(ns)
ctl "journal-wait %s $((t1 - t0))" >/dev/null

# The unit's stdout, which the harness also copies to the serial console.
t0=$(ns)
echo %s
seq -f "%s%%06.0f $PAD" 1 %d
echo %s
journalctl --sync
t1=$(ns)
ctl "journal-wait %s $((t1 - t0))" >/dev/null

ctl done >/dev/null
`, p.Bytes, p.BlockSize, p.Lines, p.journalLinePad(), ctlPort,
		p.Repeat, g2hPort, g2hPort, p.SenderBuffer, p.Streams, g2hParPort, g2hPort, g2hUnixPort, h2gPort, h2gHybPort, latencyPort, latencyPort,
		jb, journalPrefix, je, spanJournal,
		cb, consolePrefix, p.ConsoleLines, ce, spanConsole)
}
