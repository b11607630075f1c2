package wire

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"os"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

// serverBufSize and clientBufSize are the sizes of the relay's buffers on
// the upstream side (package pool) and the client side (package proxy).
const (
	serverBufSize = 16 << 10
	clientBufSize = 16 << 10
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
	fc := FrameCopier{Src: bufio.NewReaderSize(&loopReader{data: messages(t)}, serverBufSize), Dst: bufio.NewWriterSize(io.Discard, clientBufSize)}
	allocs := testing.AllocsPerRun(1000, func() {
		if _, _, _, err := fc.Next(); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("FrameCopier.Next allocates %.1f times per message; the relay must not", allocs)
	}
}

func TestCopyFrameReportsReadyStatusAndLargeBodies(t *testing.T) {
	t.Parallel()
	big, _ := (&pgproto3.DataRow{Values: [][]byte{bytes.Repeat([]byte("y"), 3*serverBufSize)}}).Encode(nil)
	z, _ := (&pgproto3.ReadyForQuery{TxStatus: 'T'}).Encode(nil)
	in := append(big, z...)
	var out bytes.Buffer
	dst := bufio.NewWriter(&out)
	fc := FrameCopier{Src: bufio.NewReaderSize(bytes.NewReader(in), 4096), Dst: dst}
	typ, _, n, err := fc.Next()
	if err != nil || typ != 'D' || n != len(big) {
		t.Fatalf("big DataRow: %q %d %v", typ, n, err)
	}
	typ, status, _, err := fc.Next()
	if err != nil || typ != 'Z' || status != 'T' {
		t.Fatalf("ReadyForQuery: %q %q %v", typ, status, err)
	}
	_ = dst.Flush()
	if !bytes.Equal(out.Bytes(), in) {
		t.Fatal("relayed bytes differ")
	}
}

// interruptingReader hands out its data in pieces of at most step bytes and
// fails with a deadline error before every piece after the first, as a relay
// interrupted by a read deadline sees it.
type interruptingReader struct {
	data        []byte
	step        int
	interrupted bool
}

func (r *interruptingReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	if !r.interrupted {
		r.interrupted = true
		return 0, os.ErrDeadlineExceeded
	}
	r.interrupted = false
	n := copy(p, r.data[:min(r.step, len(r.data))])
	r.data = r.data[n:]
	return n, nil
}

// Item 1 of the hardening issue: a read deadline that fires part-way through
// a message (RetireAt while a large row streams) must not cost the copier its
// place. Every interrupt is retried and the output is the input, byte for
// byte, with the same messages reported.
func TestRetirementInterruptMidMessageKeepsTheStream(t *testing.T) {
	t.Parallel()
	big, _ := (&pgproto3.DataRow{Values: [][]byte{bytes.Repeat([]byte("r"), 100_000)}}).Encode(nil)
	cc, _ := (&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")}).Encode(nil)
	z, _ := (&pgproto3.ReadyForQuery{TxStatus: 'I'}).Encode(nil)
	in := append(append(append([]byte{}, big...), cc...), z...)
	for _, step := range []int{1, 3, 7, 4096, 70_000} {
		var out bytes.Buffer
		dst := bufio.NewWriter(&out)
		fc := FrameCopier{Src: bufio.NewReaderSize(&interruptingReader{data: in, step: step}, 8192), Dst: dst}
		var types []byte
		interrupts := 0
		for {
			typ, _, _, err := fc.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if IsTimeout(err) {
				interrupts++
				continue // what serverToClient does after checking its flags
			}
			if err != nil {
				t.Fatalf("step %d: %v", step, err)
			}
			types = append(types, typ)
			if !fc.AtBoundary() {
				t.Fatalf("step %d: a whole message copied but not at a boundary", step)
			}
		}
		_ = dst.Flush()
		if string(types) != "DCZ" || !bytes.Equal(out.Bytes(), in) {
			t.Fatalf("step %d: messages %q (want DCZ), %d of %d bytes match", step, types, len(out.Bytes()), len(in))
		}
		if interrupts < 2 {
			t.Fatalf("step %d: only %d interrupts: the test did not interrupt mid-message", step, interrupts)
		}
	}
}

func BenchmarkCopyFrame(b *testing.B) {
	msgs := messages(b)
	fc := FrameCopier{Src: bufio.NewReaderSize(&loopReader{data: msgs}, serverBufSize), Dst: bufio.NewWriterSize(io.Discard, clientBufSize)}
	b.ReportAllocs()
	b.SetBytes(int64(len(msgs)) / 3)
	for b.Loop() {
		if _, _, _, err := fc.Next(); err != nil {
			b.Fatal(err)
		}
	}
}

// FuzzCopyFrame relays arbitrary bytes frame by frame, interrupted by a
// deadline between every few bytes: every byte that forms complete frames
// comes out unchanged, and a short length is refused.
func FuzzCopyFrame(f *testing.F) {
	z, _ := (&pgproto3.ReadyForQuery{TxStatus: 'I'}).Encode(nil)
	q, _ := (&pgproto3.Query{String: "select 1"}).Encode(nil)
	f.Add(append(q, z...))
	f.Add([]byte{'X', 0, 0, 0, 3})
	f.Add([]byte{'d', 0, 0, 0, 4})
	f.Fuzz(func(t *testing.T, in []byte) {
		var out bytes.Buffer
		dst := bufio.NewWriter(&out)
		fc := FrameCopier{Src: bufio.NewReaderSize(&interruptingReader{data: in, step: 5}, 16), Dst: dst}
		for {
			_, _, _, err := fc.Next()
			if IsTimeout(err) {
				continue
			}
			if err != nil {
				break
			}
		}
		_ = dst.Flush()
		if !bytes.HasPrefix(in, out.Bytes()) {
			t.Fatalf("relayed bytes differ from the input prefix")
		}
	})
}
