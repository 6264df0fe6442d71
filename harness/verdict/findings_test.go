package verdict

import (
	"regexp"
	"testing"

	"github.com/stretchr/testify/assert"
)

var (
	sleepDump = Coredump{Exe: "/usr/bin/sleep", Comm: "sleep", Signal: "SIGSEGV", PID: "312", Unit: "crash.service", Count: 1}
	dashDump  = Coredump{Exe: "/usr/bin/dash", Comm: "sh", Signal: "SIGABRT", PID: "305", Unit: "crash.service", Count: 1}
	asan      = SanitizerReport{Program: "sh", PID: "303", Count: 1, Lines: []string{
		"==303==ERROR: AddressSanitizer: heap-use-after-free on address 0x602000000010",
		"SUMMARY: AddressSanitizer: heap-use-after-free /src/uaf.c:7 in main",
	}}
	passed = []Event{booted, report("success", "exited", "0"), poweroff("123"), qemuOK}
)

func dumps(d ...Coredump) JournalFindings { return JournalFindings{Coredumps: d} }

func then(events []Event, more ...Event) []Event {
	return append(append([]Event(nil), events...), more...)
}

func TestOutcomeWithFindings(t *testing.T) {
	exclude := func(coredump, sanitizer string) Exclusions {
		var x Exclusions
		if coredump != "" {
			x.Coredump = regexp.MustCompile(coredump)
		}
		if sanitizer != "" {
			x.Sanitizer = regexp.MustCompile(sanitizer)
		}
		return x
	}
	tests := []struct {
		name     string
		cfg      Config
		events   []Event
		wantCode int
		// wantReason is the whole reason ("" for a pass).
		wantReason string
	}{
		{
			name:     "a clean journal: the pass stands",
			events:   then(passed, JournalFindings{}),
			wantCode: ExitPass,
		},
		{
			name:       "a core dump fails a passing test, naming the binary and the signal",
			events:     then(passed, dumps(sleepDump)),
			wantCode:   ExitFail,
			wantReason: "test passed, but /usr/bin/sleep dumped core (signal SIGSEGV)",
		},
		{
			name:     "an excluded core dump does not",
			cfg:      Config{Exclude: exclude(`^/usr/bin/sleep$`, "")},
			events:   then(passed, dumps(sleepDump)),
			wantCode: ExitPass,
		},
		{
			name:     "the exclusion is searched for in the path, as upstream's re.search",
			cfg:      Config{Exclude: exclude(`/(sleep|bash)$`, "")},
			events:   then(passed, dumps(sleepDump)),
			wantCode: ExitPass,
		},
		{
			name:       "the first dump that is not excluded is named",
			cfg:        Config{Exclude: exclude(`sleep`, "")},
			events:     then(passed, dumps(sleepDump, dashDump)),
			wantCode:   ExitFail,
			wantReason: "test passed, but /usr/bin/dash dumped core (signal SIGABRT)",
		},
		{
			name:       "more dumps are counted",
			events:     then(passed, dumps(Coredump{Exe: "/usr/bin/sleep", Signal: "SIGSEGV", Count: 3}, dashDump)),
			wantCode:   ExitFail,
			wantReason: "test passed, but /usr/bin/sleep dumped core (signal SIGSEGV), and 3 more core dumps",
		},
		{
			name:       "a dump without a path is named and excluded by its process name",
			cfg:        Config{Exclude: exclude(`^nope$`, "")},
			events:     then(passed, dumps(Coredump{Comm: "worker", Signal: "11"})),
			wantCode:   ExitFail,
			wantReason: "test passed, but worker dumped core (signal SIGSEGV)",
		},
		{
			name:     "a dump without a path, excluded by its process name",
			cfg:      Config{Exclude: exclude(`^worker$`, "")},
			events:   then(passed, dumps(Coredump{Comm: "worker", Signal: "11"})),
			wantCode: ExitPass,
		},
		{
			name:       "the test's own process dumped core: the test's own reason stays",
			events:     []Event{booted, report("core-dump", "dumped", "SEGV"), poweroff("1"), qemuOK, dumps(Coredump{Exe: "/usr/bin/dash", Signal: "SIGSEGV", Count: 1})},
			wantCode:   ExitFail,
			wantReason: "test killed by signal SIGSEGV (core dumped)",
		},
		{
			name:       "a failed test keeps its reason whatever else crashed",
			events:     []Event{booted, report("exit-code", "exited", "3"), poweroff("3"), qemuOK, dumps(sleepDump)},
			wantCode:   ExitFail,
			wantReason: "test exited with status 3",
		},
		{
			name:       "a skip with a core dump fails, as upstream's wrapper does",
			events:     []Event{booted, report("exit-code", "exited", "77"), poweroff("77"), qemuOK, dumps(sleepDump)},
			wantCode:   ExitFail,
			wantReason: "test skipped (exit status 77), but /usr/bin/sleep dumped core (signal SIGSEGV)",
		},
		{
			name:       "so does a condition skip",
			events:     []Event{booted, report(ResultCondition, "", ""), poweroff("77"), qemuOK, dumps(sleepDump)},
			wantCode:   ExitFail,
			wantReason: "test skipped: a condition of its unit was not met, but /usr/bin/sleep dumped core (signal SIGSEGV)",
		},
		{
			name:       "shell mode stays shell mode",
			cfg:        Config{TestNotStarted: true},
			events:     []Event{booted, ready, Stopped{Why: StopShellExited}, QEMUExited{Signal: "terminated"}, dumps(sleepDump)},
			wantCode:   ExitSkip,
			wantReason: "shell mode: the test unit was installed but not run",
		},
		{
			name:       "a harness error stays a harness error",
			events:     []Event{QEMUExited{Status: 1, Stderr: "qemu: bad"}, dumps(sleepDump)},
			wantCode:   ExitHarnessError,
			wantReason: "QEMU failed: qemu: bad",
		},
		{
			name:       "keep mode: the held failure stays",
			cfg:        Config{KeepOnFailure: true},
			events:     []Event{booted, report("exit-code", "exited", "3"), Stopped{Why: StopKeepTimeUp}, QEMUExited{Signal: "terminated"}, dumps(sleepDump)},
			wantCode:   ExitFail,
			wantReason: "test exited with status 3",
		},
		{
			name:       "a pass from the journal's record of the unit fails too",
			events:     []Event{booted, poweroff("123"), qemuOK, JournalUnitResult{Found: true, Result: UnitResult{Result: "success", ExitCode: "exited", ExitStatus: "0"}}, dumps(sleepDump)},
			wantCode:   ExitFail,
			wantReason: "test passed, but /usr/bin/sleep dumped core (signal SIGSEGV)",
		},
		{
			name:       "a sanitizer report fails a passing test with its first line",
			events:     then(passed, JournalFindings{SanitizerReports: []SanitizerReport{asan}}),
			wantCode:   ExitFail,
			wantReason: "test passed, but sh[303] printed a sanitizer report: ==303==ERROR: AddressSanitizer: heap-use-after-free on address 0x602000000010",
		},
		{
			name:     "an excluded program's report does not",
			cfg:      Config{Exclude: exclude("", `^sh$`)},
			events:   then(passed, JournalFindings{SanitizerReports: []SanitizerReport{asan}}),
			wantCode: ExitPass,
		},
		{
			name:       "the coredump exclusion does not exclude reports, nor the other way round",
			cfg:        Config{Exclude: exclude(`^sh$`, `sleep`)},
			events:     then(passed, JournalFindings{Coredumps: []Coredump{sleepDump}, SanitizerReports: []SanitizerReport{asan}}),
			wantCode:   ExitFail,
			wantReason: "test passed, but /usr/bin/sleep dumped core (signal SIGSEGV); also sh[303] printed a sanitizer report: ==303==ERROR: AddressSanitizer: heap-use-after-free on address 0x602000000010",
		},
		{
			name:       "more reports are counted",
			events:     then(passed, JournalFindings{SanitizerReports: []SanitizerReport{asan, {Program: "b", Lines: []string{"x: runtime error"}, Count: 2}}}),
			wantCode:   ExitFail,
			wantReason: "test passed, but sh[303] printed a sanitizer report: ==303==ERROR: AddressSanitizer: heap-use-after-free on address 0x602000000010 (and 2 more reports)",
		},
		{
			name:       "findings the summary could not list count, and no exclusion can clear them",
			cfg:        Config{Exclude: exclude(`.`, `.`)},
			events:     then(passed, JournalFindings{Coredumps: []Coredump{sleepDump}, CoredumpsUnlisted: 2}),
			wantCode:   ExitFail,
			wantReason: "test passed, but 2 core dumps of programs the journal summary could not list",
		},
		{
			name:       "a signal number is named; an unknown one stays a number",
			events:     then(passed, dumps(Coredump{Exe: "/a", Signal: "6"}, Coredump{Exe: "/b", Signal: "42"})),
			wantCode:   ExitFail,
			wantReason: "test passed, but /a dumped core (signal SIGABRT), and 1 more core dump",
		},
		{
			name: "hostile field values are sanitized",
			events: then(passed, JournalFindings{
				Coredumps:        []Coredump{{Exe: "/usr/bin/\x1b[2Jevil\nFAIL", Signal: "\x1b]0;x\x07"}},
				SanitizerReports: []SanitizerReport{{Program: "e\x1bvil", PID: "1\n2", Lines: []string{"\x1b[31m==1==ERROR: AddressSanitizer\r\nx"}}},
			}),
			wantCode:   ExitFail,
			wantReason: "test passed, but /usr/bin/?[2Jevil?FAIL dumped core (signal unknown); also e?vil[1?2] printed a sanitizer report: ?[31m==1==ERROR: AddressSanitizer??x",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := New(tt.cfg)
			for _, e := range tt.events {
				v.Handle(e)
			}
			got := v.Outcome()
			assert.Equal(t, tt.wantCode, got.ExitCode, "reason: %s", got.Reason)
			assert.Equal(t, tt.wantReason, got.Reason)
		})
	}
}

// TestFindingsNeverPass: with a core dump or a sanitizer report that is
// not excluded, no way a test can end is a pass.
func TestFindingsNeverPass(t *testing.T) {
	ends := [][]Event{
		passed,
		{booted, poweroff("123"), qemuOK, JournalUnitResult{Found: true, Result: UnitResult{Result: "success"}}},
		{booted, report("success", "exited", "0"), poweroff("123"), Stopped{Why: StopShutdownTimeout}, QEMUExited{Signal: "terminated"}},
		{booted, report("exit-code", "exited", "77"), poweroff("77"), qemuOK},
	}
	findings := []JournalFindings{
		dumps(sleepDump),
		{SanitizerReports: []SanitizerReport{asan}},
		{CoredumpsUnlisted: 1},
		{SanitizerReportsUnlisted: 1},
	}
	for _, events := range ends {
		for _, f := range findings {
			for _, keep := range []bool{false, true} {
				v := New(Config{KeepOnFailure: keep})
				for _, e := range events {
					v.Handle(e)
				}
				v.Handle(f)
				got := v.Outcome()
				assert.False(t, got.Passed(), "events %v findings %v", events, f)
				assert.False(t, got.Skipped(), "events %v findings %v: %s", events, f, got.Reason)
			}
		}
	}
}

func TestCoredumpString(t *testing.T) {
	assert.Equal(t, "/usr/bin/sleep (sleep, pid 312, SIGSEGV, unit crash.service)", sleepDump.String())
	assert.Equal(t, "/usr/bin/x (x, SIGABRT, 4 dumps)", Coredump{Exe: "/usr/bin/x", Comm: "x", Signal: "6", Count: 4}.String())
	assert.Equal(t, []string{"?[2J==1==", "ok"}, SanitizerReport{Lines: []string{"\x1b[2J==1==", "ok"}}.Text())
}
