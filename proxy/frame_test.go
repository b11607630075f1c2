package proxy

import (
	"bufio"
	"bytes"
	"io"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

// loopReader replays the same bytes forever, so the relay can be measured
// without I/O.
type loopReader struct {
	data []byte
	off  int
}

func (l *loopReader) Read(p []byte) (int, error) {
	n := copy(p, l.data[l.off:])
	l.off = (l.off + n) % len(l.data)
	return n, nil
}

func messages(t testing.TB) []byte {
	t.Helper()
	var b []byte
	b, _ = (&pgproto3.DataRow{Values: [][]byte{[]byte("42"), bytes.Repeat([]byte("x"), 100)}}).Encode(b)
	b, _ = (&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")}).Encode(b)
	b, _ = (&pgproto3.ReadyForQuery{TxStatus: 'I'}).Encode(b)
	return b
}

// The relay's steady state must not allocate per message.
func TestCopyFrameDoesNotAllocate(t *testing.T) {
	src := bufio.NewReaderSize(&loopReader{data: messages(t)}, ioBufSize)
	dst := bufio.NewWriterSize(io.Discard, ioBufSize)
	allocs := testing.AllocsPerRun(1000, func() {
		if _, _, _, err := copyFrame(dst, src); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("copyFrame allocates %.1f times per message; the relay must not", allocs)
	}
}

func TestCopyFrameReportsReadyStatusAndLargeBodies(t *testing.T) {
	t.Parallel()
	big, _ := (&pgproto3.DataRow{Values: [][]byte{bytes.Repeat([]byte("y"), 3*ioBufSize)}}).Encode(nil)
	z, _ := (&pgproto3.ReadyForQuery{TxStatus: 'T'}).Encode(nil)
	in := append(big, z...)
	src := bufio.NewReaderSize(bytes.NewReader(in), 4096)
	var out bytes.Buffer
	dst := bufio.NewWriter(&out)
	typ, _, n, err := copyFrame(dst, src)
	if err != nil || typ != 'D' || n != len(big) {
		t.Fatalf("big DataRow: %q %d %v", typ, n, err)
	}
	typ, status, _, err := copyFrame(dst, src)
	if err != nil || typ != 'Z' || status != 'T' {
		t.Fatalf("ReadyForQuery: %q %q %v", typ, status, err)
	}
	_ = dst.Flush()
	if !bytes.Equal(out.Bytes(), in) {
		t.Fatal("relayed bytes differ")
	}
}

func BenchmarkCopyFrame(b *testing.B) {
	msgs := messages(b)
	src := bufio.NewReaderSize(&loopReader{data: msgs}, ioBufSize)
	dst := bufio.NewWriterSize(io.Discard, ioBufSize)
	b.ReportAllocs()
	b.SetBytes(int64(len(msgs)) / 3)
	for b.Loop() {
		if _, _, _, err := copyFrame(dst, src); err != nil {
			b.Fatal(err)
		}
	}
}
