package journalremote

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// field is a test-side view of one parsed field.
type field struct{ name, value string }

func fieldsOf(e *Entry) []field {
	out := make([]field, 0, e.Len())
	for i := range e.Len() {
		n, v := e.Field(i)
		out = append(out, field{string(n), string(v)})
	}
	return out
}

// parseAll parses stream to its end and returns the complete entries and the
// final error (io.EOF for a clean end), plus the fields kept from an
// unfinished entry.
func parseAll(t testing.TB, r io.Reader, lim Limits) (entries [][]field, partial []field, err error) {
	t.Helper()
	p := NewParser(r, lim)
	var e Entry
	for {
		err := p.Next(&e)
		if err != nil {
			return entries, fieldsOf(&e), err
		}
		entries = append(entries, fieldsOf(&e))
	}
}

func binField(name, value string) string {
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], uint64(len(value)))
	return name + "\n" + string(n[:]) + value + "\n"
}

func TestParserTable(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    [][]field
		partial []field
		err     error // nil means a clean io.EOF
	}{
		{
			name: "two text entries",
			in:   "MESSAGE=hello\n_PID=1\n\nMESSAGE=world\n\n",
			want: [][]field{{{"MESSAGE", "hello"}, {"_PID", "1"}}, {{"MESSAGE", "world"}}},
		},
		{
			name: "binary field with newline",
			in:   binField("MESSAGE", "multi\nline\n") + "A=b\n\n",
			want: [][]field{{{"MESSAGE", "multi\nline\n"}, {"A", "b"}}},
		},
		{
			name: "binary field with NUL and control bytes",
			in:   binField("BLOB", "\x00\x01\x02\xff") + "\n",
			want: [][]field{{{"BLOB", "\x00\x01\x02\xff"}}},
		},
		{
			name: "empty text and binary values",
			in:   "EMPTY=\n" + binField("EMPTYBIN", "") + "\n",
			want: [][]field{{{"EMPTY", ""}, {"EMPTYBIN", ""}}},
		},
		{
			name: "value containing =",
			in:   "MESSAGE=a=b=c\n\n",
			want: [][]field{{{"MESSAGE", "a=b=c"}}},
		},
		{
			name: "repeated field names kept in order",
			in:   "X=1\nX=2\n\n",
			want: [][]field{{{"X", "1"}, {"X", "2"}}},
		},
		{
			name: "metadata fields are valid names",
			in:   "__CURSOR=s=1;i=2\n__REALTIME_TIMESTAMP=1\n_BOOT_ID=00\n\n",
			want: [][]field{{{"__CURSOR", "s=1;i=2"}, {"__REALTIME_TIMESTAMP", "1"}, {"_BOOT_ID", "00"}}},
		},
		{
			name: "blank lines between entries are skipped",
			in:   "\n\nA=1\n\n\n\nB=2\n\n",
			want: [][]field{{{"A", "1"}}, {{"B", "2"}}},
		},
		{
			name: "empty stream",
			in:   "",
		},
		{
			name:    "missing final empty line",
			in:      "A=1\n\nB=2\n",
			want:    [][]field{{{"A", "1"}}},
			partial: []field{{"B", "2"}},
			err:     ErrTruncated,
		},
		{
			name:    "partial text line dropped",
			in:      "A=1\nMESSAGE=hal",
			partial: []field{{"A", "1"}},
			err:     ErrTruncated,
		},
		{
			name:    "binary value cut short",
			in:      "A=1\nBLOB\n\x10\x00\x00\x00\x00\x00\x00\x00abc",
			partial: []field{{"A", "1"}},
			err:     ErrTruncated,
		},
		{
			name: "lowercase name",
			in:   "message=x\n\n",
			err:  ErrMalformed,
		},
		{
			name: "name starting with digit",
			in:   "1A=x\n\n",
			err:  ErrMalformed,
		},
		{
			name: "empty name",
			in:   "=x\n\n",
			err:  ErrMalformed,
		},
		{
			name: "name longer than 64",
			in:   strings.Repeat("A", 65) + "=x\n\n",
			err:  ErrMalformed,
		},
		{
			name: "64 character name is fine",
			in:   strings.Repeat("A", 64) + "=x\n\n",
			want: [][]field{{{strings.Repeat("A", 64), "x"}}},
		},
		{
			name:    "binary field without closing newline",
			in:      "A=1\nB\n\x01\x00\x00\x00\x00\x00\x00\x00xY\n",
			partial: []field{{"A", "1"}},
			err:     ErrMalformed,
		},
		{
			name: "garbage",
			in:   "\x00\x01garbage\n\n",
			err:  ErrMalformed,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			entries, partial, err := parseAll(t, strings.NewReader(tc.in), Limits{})
			if tc.err == nil {
				require.ErrorIs(t, err, io.EOF)
			} else {
				require.ErrorIs(t, err, tc.err)
			}
			assert.Equal(t, tc.want, entries)
			if tc.partial == nil {
				tc.partial = []field{}
			}
			assert.Equal(t, tc.partial, partial)
		})
	}
}

func TestParserLimits(t *testing.T) {
	lim := Limits{MaxFieldSize: 8, MaxEntrySize: 64, MaxFields: 3}

	t.Run("long text value is cut and the stream stays in sync", func(t *testing.T) {
		p := NewParser(strings.NewReader("MESSAGE=0123456789abcdef\nA=1\n\nB=2\n\n"), lim)
		var e Entry
		require.NoError(t, p.Next(&e))
		assert.Equal(t, []field{{"MESSAGE", "01234567"}, {"A", "1"}}, fieldsOf(&e))
		assert.Equal(t, 1, e.TruncatedFields())
		require.NoError(t, p.Next(&e))
		assert.Equal(t, []field{{"B", "2"}}, fieldsOf(&e))
		assert.Equal(t, 0, e.TruncatedFields())
	})
	t.Run("long binary value is cut and the rest skipped", func(t *testing.T) {
		in := binField("BLOB", strings.Repeat("x", 1000)) + "\nB=2\n\n"
		entries, _, err := parseAll(t, strings.NewReader(in), lim)
		require.ErrorIs(t, err, io.EOF)
		assert.Equal(t, [][]field{{{"BLOB", "xxxxxxxx"}}, {{"B", "2"}}}, entries)
	})
	t.Run("text line longer than the read buffer", func(t *testing.T) {
		long := strings.Repeat("y", 3*parserBufferSize+17)
		entries, _, err := parseAll(t, strings.NewReader("MESSAGE="+long+"\nZ=1\n\n"), Limits{})
		require.ErrorIs(t, err, io.EOF)
		assert.Equal(t, [][]field{{{"MESSAGE", long}, {"Z", "1"}}}, entries)
	})
	t.Run("too many fields", func(t *testing.T) {
		_, _, err := parseAll(t, strings.NewReader("A=1\nB=2\nC=3\nD=4\n\n"), lim)
		require.ErrorIs(t, err, ErrMalformed)
		assert.Contains(t, err.Error(), "more than 3 fields")
	})
	t.Run("entry too large", func(t *testing.T) {
		in := "A=12345678\nB=12345678\nC=12345678\n\n"
		_, _, err := parseAll(t, strings.NewReader(in), Limits{MaxFieldSize: 8, MaxEntrySize: 20, MaxFields: 10})
		require.ErrorIs(t, err, ErrMalformed)
		assert.Contains(t, err.Error(), "larger than 20 bytes")
	})
	t.Run("huge declared binary size does not allocate it", func(t *testing.T) {
		in := "BLOB\n\xff\xff\xff\xff\xff\xff\xff\x7fxyz"
		entries, _, err := parseAll(t, strings.NewReader(in), lim)
		require.ErrorIs(t, err, ErrTruncated)
		assert.Empty(t, entries)
	})
}

// TestParserTruncatedAtEveryOffset cuts a sample stream at every byte and
// checks that every entry that was complete before the cut is returned
// intact, and that the cut is reported as ErrTruncated (or a clean EOF when
// it falls between entries).
func TestParserTruncatedAtEveryOffset(t *testing.T) {
	entries := []string{
		"_BOOT_ID=0123456789abcdef0123456789abcdef\nMESSAGE=first\n__REALTIME_TIMESTAMP=1700000000000000\n\n",
		binField("MESSAGE", "two\nlines") + "_SYSTEMD_UNIT=foo.service\n\n",
		"EMPTY=\n" + binField("BLOB", "\x00\x01") + "\n",
	}
	sample := strings.Join(entries, "")
	ends := []int{}
	for i, n := 0, 0; i < len(entries); i++ {
		n += len(entries[i])
		ends = append(ends, n)
	}
	_, _, err := parseAll(t, strings.NewReader(sample), Limits{})
	require.ErrorIs(t, err, io.EOF)

	for cut := 0; cut <= len(sample); cut++ {
		got, partial, err := parseAll(t, iotest.OneByteReader(strings.NewReader(sample[:cut])), Limits{})
		complete := 0
		for _, end := range ends {
			if end <= cut {
				complete++
			}
		}
		require.Len(t, got, complete, "cut at %d", cut)
		atBoundary := cut == 0 || complete > 0 && ends[complete-1] == cut
		// A cut right after the last field but before the empty line is
		// still a truncated entry.
		if atBoundary {
			require.ErrorIs(t, err, io.EOF, "cut at %d", cut)
			assert.Empty(t, partial)
		} else {
			require.ErrorIs(t, err, ErrTruncated, "cut at %d", cut)
			require.ErrorIs(t, err, io.ErrUnexpectedEOF)
		}
	}
}

func TestEntryAppendExportRoundTrip(t *testing.T) {
	var e Entry
	require.NoError(t, e.Add("MESSAGE", []byte("tab\tis text")))
	require.NoError(t, e.Add("MULTI", []byte("a\nb")))
	require.NoError(t, e.Add("EMPTY", nil))
	require.NoError(t, e.Add("BIN", []byte{0, 1, 2}))
	require.Error(t, e.Add("bad", nil))

	out := e.AppendExport(nil)
	assert.True(t, bytes.HasPrefix(out, []byte("MESSAGE=tab\tis text\nMULTI\n\x03\x00\x00\x00\x00\x00\x00\x00a\nb\n")))
	entries, _, err := parseAll(t, bytes.NewReader(out), Limits{})
	require.ErrorIs(t, err, io.EOF)
	assert.Equal(t, [][]field{fieldsOf(&e)}, entries)
}

func TestParserReadError(t *testing.T) {
	boom := errors.New("connection reset")
	r := io.MultiReader(strings.NewReader("A=1\n\nB=2\n"), iotest.ErrReader(boom))
	entries, partial, err := parseAll(t, r, Limits{})
	require.ErrorIs(t, err, boom)
	assert.Equal(t, [][]field{{{"A", "1"}}}, entries)
	assert.Equal(t, []field{{"B", "2"}}, partial)
}

// FuzzExportParser checks that arbitrary input never panics or breaks the
// limits, and that whatever parses re-encodes to the same entries.
func FuzzExportParser(f *testing.F) {
	f.Add([]byte("MESSAGE=hello\n_PID=1\n\n"))
	f.Add([]byte(binField("MESSAGE", "a\nb") + "\n"))
	f.Add([]byte("A=1\nBLOB\n\x02\x00\x00\x00\x00\x00\x00\x00xy\n\nB="))
	f.Add([]byte("BLOB\n\xff\xff\xff\xff\xff\xff\xff\xff"))
	f.Add([]byte("\n\n\n=\n"))
	lim := Limits{MaxFieldSize: 32, MaxEntrySize: 256, MaxFields: 8}
	f.Fuzz(func(t *testing.T, in []byte) {
		p := NewParser(bytes.NewReader(in), lim)
		var e Entry
		var reencoded []byte
		var parsed [][]field
		for {
			err := p.Next(&e)
			require.LessOrEqual(t, e.Len(), lim.MaxFields)
			require.LessOrEqual(t, len(e.data), lim.MaxEntrySize)
			for i := range e.Len() {
				name, value := e.Field(i)
				require.True(t, ValidFieldName(name), "invalid name %q", name)
				require.LessOrEqual(t, len(value), lim.MaxFieldSize)
			}
			if err != nil {
				require.LessOrEqual(t, p.Offset(), int64(len(in)))
				break
			}
			require.Positive(t, e.Len())
			parsed = append(parsed, fieldsOf(&e))
			reencoded = e.AppendExport(reencoded)
		}
		again, _, err := parseAll(t, bytes.NewReader(reencoded), lim)
		require.ErrorIs(t, err, io.EOF)
		require.Equal(t, parsed, again)
	})
}
