package journalremote

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
)

// Errors a Parser returns; test with errors.Is.
var (
	// ErrMalformed means the stream is not Journal Export Format (a bad
	// field name, a binary field without its closing newline, an entry
	// over the limits). The stream cannot be resynchronised after it.
	ErrMalformed = errors.New("malformed journal export stream")

	// ErrTruncated means the stream ended inside an entry. It wraps
	// io.ErrUnexpectedEOF.
	ErrTruncated = fmt.Errorf("journal export stream ended inside an entry: %w", io.ErrUnexpectedEOF)
)

// maxFieldNameLen is journald's own limit on field names (journal_field_valid).
const maxFieldNameLen = 64

// Limits bound what one entry from an untrusted guest can cost the host.
// A zero field means the default from DefaultLimits.
type Limits struct {
	// MaxFieldSize caps one field's value. A longer value is cut to this
	// size, the rest is skipped on the wire and the entry is marked as
	// truncated; the stream stays in sync because binary fields carry
	// their length and text fields end at a newline.
	MaxFieldSize int
	// MaxEntrySize caps the bytes of all names and values of one entry; a
	// larger entry is ErrMalformed.
	MaxEntrySize int
	// MaxFields caps the number of fields of one entry; more is ErrMalformed.
	MaxFields int
}

// DefaultLimits returns the limits the Collector uses.
//
// 4 MiB per field: journald caps a stdout log line at 48 KiB (LineMax=) and a
// kernel message at a few KiB; only native-protocol senders come near
// journald's own 768 MiB DATA_SIZE_MAX, and a test's log is never that. A
// field over the cap is kept cut, not dropped, so even then nothing around it
// is lost. 16 MiB per entry and 2048 fields per entry leave room for
// journald's 1024 user fields plus its own metadata.
func DefaultLimits() Limits {
	return Limits{MaxFieldSize: 4 << 20, MaxEntrySize: 16 << 20, MaxFields: 2048}
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	if l.MaxFieldSize <= 0 {
		l.MaxFieldSize = d.MaxFieldSize
	}
	if l.MaxEntrySize <= 0 {
		l.MaxEntrySize = d.MaxEntrySize
	}
	if l.MaxFields <= 0 {
		l.MaxFields = d.MaxFields
	}
	return l
}

// Entry is one journal entry: an ordered list of fields, where a name may
// repeat. Its byte slices are only valid until the Entry is reused, so one
// Entry can carry a whole stream without allocating per field.
type Entry struct {
	data      []byte // names and values back to back
	fields    []fieldSpan
	truncated int // fields cut to Limits.MaxFieldSize
}

type fieldSpan struct {
	off, nameLen, valueLen int // name at data[off:], value right after it
}

// Reset empties e, keeping its storage.
func (e *Entry) Reset() {
	e.data = e.data[:0]
	e.fields = e.fields[:0]
	e.truncated = 0
}

// Len is the number of fields.
func (e *Entry) Len() int { return len(e.fields) }

// Field returns the name and value of field i (0 <= i < Len).
func (e *Entry) Field(i int) (name, value []byte) {
	f := e.fields[i]
	v := f.off + f.nameLen
	return e.data[f.off:v:v], e.data[v : v+f.valueLen : v+f.valueLen]
}

// Value returns the value of the first field called name.
func (e *Entry) Value(name string) ([]byte, bool) {
	for i := range e.fields {
		n, v := e.Field(i)
		if string(n) == name {
			return v, true
		}
	}
	return nil, false
}

// TruncatedFields is how many values were cut to Limits.MaxFieldSize.
func (e *Entry) TruncatedFields() int { return e.truncated }

// Add appends a field. It rejects names journald would reject.
func (e *Entry) Add(name string, value []byte) error {
	if !ValidFieldName([]byte(name)) {
		return fmt.Errorf("journal field name %q: must be 1-%d characters of A-Z, 0-9 and _, not starting with a digit", name, maxFieldNameLen)
	}
	e.fields = append(e.fields, fieldSpan{off: len(e.data), nameLen: len(name), valueLen: len(value)})
	e.data = append(e.data, name...)
	e.data = append(e.data, value...)
	return nil
}

// AppendExport appends e in Journal Export Format, including the empty line
// that ends it, and returns the extended buffer.
func (e *Entry) AppendExport(dst []byte) []byte {
	for i := range e.fields {
		name, value := e.Field(i)
		dst = appendExportField(dst, name, value)
	}
	return append(dst, '\n')
}

// appendExportField writes a field in text form when its value allows it and
// in the length-prefixed binary form otherwise, by the same rule journald
// uses when it forwards: any control character other than TAB.
func appendExportField(dst, name, value []byte) []byte {
	dst = append(dst, name...)
	if !needsBinary(value) {
		dst = append(dst, '=')
		dst = append(dst, value...)
		return append(dst, '\n')
	}
	dst = append(dst, '\n')
	dst = binary.LittleEndian.AppendUint64(dst, uint64(len(value)))
	dst = append(dst, value...)
	return append(dst, '\n')
}

func needsBinary(value []byte) bool {
	for _, c := range value {
		if c < ' ' && c != '\t' {
			return true
		}
	}
	return false
}

// ValidFieldName reports whether journald accepts name as a field name:
// 1 to 64 characters of A-Z, 0-9 and '_', not starting with a digit. Names
// with a leading underscore (trusted fields) and two (export metadata such as
// __REALTIME_TIMESTAMP) are valid here; what they mean is the reader's call.
func ValidFieldName(name []byte) bool {
	if len(name) == 0 || len(name) > maxFieldNameLen || (name[0] >= '0' && name[0] <= '9') {
		return false
	}
	for _, c := range name {
		if !(c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// parserBufferSize is also the longest line ReadSlice hands back in one
// piece; longer text fields are read in chunks.
const parserBufferSize = 64 << 10

// Parser reads Journal Export Format from a stream, one entry at a time, in
// memory bounded by its Limits.
type Parser struct {
	r   *bufio.Reader
	lim Limits
	off int64 // bytes consumed, for error messages
	err error // sticky once the stream is over or broken
	num [8]byte
	// cutting is set while the current field's value is over MaxFieldSize.
	cutting bool
}

// NewParser returns a Parser reading r with the given limits (zero fields
// take the defaults).
func NewParser(r io.Reader, lim Limits) *Parser {
	return &Parser{r: bufio.NewReaderSize(r, parserBufferSize), lim: lim.withDefaults()}
}

// Offset is the number of stream bytes consumed so far.
func (p *Parser) Offset() int64 { return p.off }

// Buffered is the number of bytes read from the stream but not yet parsed;
// zero means the next Next call will wait for the stream.
func (p *Parser) Buffered() int { return p.r.Buffered() }

// Next reads the next entry into e, reusing its storage.
//
// It returns nil with a complete entry of at least one field (empty entries
// are skipped), io.EOF when the stream ended cleanly between entries, an
// error wrapping ErrTruncated when it ended inside an entry, one wrapping
// ErrMalformed for input that is not export format, or the read error. On
// every error but io.EOF, e holds the fields of the unfinished entry that
// arrived completely (possibly none), so a caller can keep them. After an
// error Next keeps returning it.
func (p *Parser) Next(e *Entry) error {
	e.Reset()
	if p.err != nil {
		return p.err
	}
	err := p.next(e)
	if err != nil {
		p.err = err
	}
	return err
}

func (p *Parser) next(e *Entry) error {
	for {
		line, err := p.r.ReadSlice('\n')
		p.off += int64(len(line))
		switch {
		case err == nil:
		case errors.Is(err, bufio.ErrBufferFull):
			// A line longer than the buffer can only be a text field.
			if ferr := p.longTextField(e, line); ferr != nil {
				return ferr
			}
			continue
		default:
			return p.endOfStream(e, len(line) > 0, err)
		}

		if len(line) == 1 { // the empty line that ends an entry
			if e.Len() == 0 {
				continue
			}
			return nil
		}
		line = line[:len(line)-1]
		if eq := bytes.IndexByte(line, '='); eq >= 0 {
			if err := p.beginField(e, line[:eq]); err != nil {
				return err
			}
			p.appendValue(e, line[eq+1:])
			if err := p.checkEntrySize(e); err != nil {
				return err
			}
			continue
		}
		if err := p.binaryField(e, line); err != nil {
			return err
		}
	}
}

// endOfStream turns the end of the input into the right error.
func (p *Parser) endOfStream(e *Entry, partialLine bool, err error) error {
	if errors.Is(err, io.EOF) {
		if e.Len() == 0 && !partialLine {
			return io.EOF
		}
		return fmt.Errorf("%w (at byte %d, %d complete fields kept)", ErrTruncated, p.off, e.Len())
	}
	return fmt.Errorf("reading journal export stream at byte %d: %w", p.off, err)
}

func (p *Parser) malformed(format string, args ...any) error {
	return fmt.Errorf("%w at byte %d: %s", ErrMalformed, p.off, fmt.Sprintf(format, args...))
}

func (p *Parser) beginField(e *Entry, name []byte) error {
	if !ValidFieldName(name) {
		return p.malformed("invalid field name %q", clip(name, maxFieldNameLen+1))
	}
	if len(e.fields) >= p.lim.MaxFields {
		return p.malformed("entry has more than %d fields", p.lim.MaxFields)
	}
	e.fields = append(e.fields, fieldSpan{off: len(e.data), nameLen: len(name)})
	e.data = append(e.data, name...)
	p.cutting = false
	return nil
}

// appendValue adds b to the current field's value, cutting it at
// MaxFieldSize.
func (p *Parser) appendValue(e *Entry, b []byte) {
	f := &e.fields[len(e.fields)-1]
	if room := p.lim.MaxFieldSize - f.valueLen; len(b) > room {
		if !p.cutting {
			p.cutting = true
			e.truncated++
		}
		b = b[:room]
	}
	f.valueLen += len(b)
	e.data = append(e.data, b...)
}

func (p *Parser) checkEntrySize(e *Entry) error {
	if len(e.data) > p.lim.MaxEntrySize {
		e.dropLastField()
		return p.malformed("entry larger than %d bytes", p.lim.MaxEntrySize)
	}
	return nil
}

func (e *Entry) dropLastField() {
	f := e.fields[len(e.fields)-1]
	e.fields = e.fields[:len(e.fields)-1]
	e.data = e.data[:f.off]
}

// longTextField reads a text field whose line did not fit the buffer; first
// is the beginning of the line.
func (p *Parser) longTextField(e *Entry, first []byte) error {
	eq := bytes.IndexByte(first, '=')
	if eq < 0 {
		return p.malformed("line of more than %d bytes without '='", len(first))
	}
	if err := p.beginField(e, first[:eq]); err != nil {
		return err
	}
	p.appendValue(e, first[eq+1:])
	for {
		if len(e.data) > p.lim.MaxEntrySize {
			return p.checkEntrySize(e)
		}
		chunk, err := p.r.ReadSlice('\n')
		p.off += int64(len(chunk))
		switch {
		case err == nil:
			p.appendValue(e, chunk[:len(chunk)-1])
			return p.checkEntrySize(e)
		case errors.Is(err, bufio.ErrBufferFull):
			p.appendValue(e, chunk)
		default:
			e.dropLastField()
			return p.endOfStream(e, true, err)
		}
	}
}

// binaryField reads "NAME\n" (already consumed, name given), a little-endian
// 64-bit size, the value and a newline.
func (p *Parser) binaryField(e *Entry, name []byte) error {
	if err := p.beginField(e, name); err != nil {
		return err
	}
	n, err := io.ReadFull(p.r, p.num[:])
	p.off += int64(n)
	if err != nil {
		e.dropLastField()
		return p.endOfStream(e, true, eofIfUnexpected(err))
	}
	size := binary.LittleEndian.Uint64(p.num[:])
	keep := uint64(p.lim.MaxFieldSize)
	if size <= keep {
		keep = size
	} else {
		e.truncated++
	}
	if uint64(len(e.data))+keep > uint64(p.lim.MaxEntrySize) {
		e.dropLastField()
		return p.malformed("entry larger than %d bytes", p.lim.MaxEntrySize)
	}
	start := len(e.data)
	e.data = slices.Grow(e.data, int(keep))[:start+int(keep)]
	n, err = io.ReadFull(p.r, e.data[start:])
	p.off += int64(n)
	if err != nil {
		e.dropLastField()
		return p.endOfStream(e, true, eofIfUnexpected(err))
	}
	e.fields[len(e.fields)-1].valueLen = int(keep)
	for skip := size - keep; skip > 0; {
		chunk := int(min(skip, 1<<30))
		n, err := p.r.Discard(chunk)
		p.off += int64(n)
		skip -= uint64(n)
		if err != nil {
			e.dropLastField()
			return p.endOfStream(e, true, err)
		}
	}
	c, err := p.r.ReadByte()
	if err != nil {
		e.dropLastField()
		return p.endOfStream(e, true, err)
	}
	p.off++
	if c != '\n' {
		fieldName, _ := e.Field(e.Len() - 1)
		err := p.malformed("binary field %s of %d bytes not followed by a newline", fieldName, size)
		e.dropLastField()
		return err
	}
	return nil
}

func eofIfUnexpected(err error) error {
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return io.EOF
	}
	return err
}

// clip shortens guest-controlled bytes for an error message.
func clip(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}
