package pack

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/casnix/casnix/digest"
)

func TestRecordRoundTrip(t *testing.T) {
	entries := []Entry{{digest.Sum([]byte("a")), 1}, {digest.Sum([]byte("bc")), 2}}
	var buf bytes.Buffer
	buf.Write(Header())
	hdr := RecordHeader(entries, 5)
	buf.Write(hdr)
	buf.WriteString("zzzzz")
	b := buf.Bytes()
	if err := CheckHeader(b); err != nil {
		t.Fatal(err)
	}
	r := bytes.NewReader(b[HeaderSize:])
	rec, err := ReadRecord(r)
	if err != nil {
		t.Fatal(err)
	}
	if rec.CLen != 5 || rec.RawLen != 3 || rec.HdrLen != int64(len(hdr)) || len(rec.Entries) != 2 || rec.Entries[1] != entries[1] {
		t.Fatalf("rec = %+v", rec)
	}
	r.Seek(rec.CLen, io.SeekCurrent)
	if _, err := ReadRecord(r); err != io.EOF {
		t.Fatalf("at end: %v", err)
	}
}

func TestRecordCorrupt(t *testing.T) {
	good := RecordHeader([]Entry{{digest.Sum(nil), 7}}, 9)
	flip := func(i int) []byte { b := bytes.Clone(good); b[i] ^= 1; return b }
	tests := []struct {
		name string
		b    []byte
		want error
	}{
		{"torn fixed", good[:10], io.ErrUnexpectedEOF},
		{"torn entries", good[:20], io.ErrUnexpectedEOF},
		{"magic", flip(0), ErrCorrupt},
		{"crc", flip(20), ErrCorrupt},
		{"zero chunks", append([]byte("FRM1"), make([]byte, 12)...), ErrCorrupt},
		{"huge count", append([]byte("FRM1\xff\xff\xff\xff"), make([]byte, 8)...), ErrCorrupt},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ReadRecord(bytes.NewReader(tc.b))
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
}

func FuzzReadRecord(f *testing.F) {
	f.Add(RecordHeader([]Entry{{digest.Sum(nil), 7}}, 9))
	f.Fuzz(func(t *testing.T, b []byte) {
		rec, err := ReadRecord(bytes.NewReader(b))
		if err != nil {
			return
		}
		if !bytes.Equal(RecordHeader(rec.Entries, int(rec.CLen)), b[:rec.HdrLen]) {
			t.Fatal("accepted record does not re-encode identically")
		}
	})
}
