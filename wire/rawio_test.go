package wire

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// A raw-I/O connection reads everything written in pieces with pauses between them,
// and the end of the stream as soon as the writer closes, even when the close
// follows the last bytes at once (a FIN that arrives with the data: an
// earlier version that skipped the read after a short one slept through it).
func TestRawReaderReadsEverythingAndTheEnd(t *testing.T) {
	t.Parallel()
	for range 20 {
		client, server := tcpPair(t)
		rr := WithRawIO(server)
		if _, ok := rr.(*rawIOConn); !ok {
			t.Fatal("a TCP connection gets no raw I/O")
		}
		want := bytes.Repeat([]byte("0123456789"), 5000)
		go func() {
			for i := 0; i < len(want); i += 977 {
				_, _ = client.Write(want[i:min(i+977, len(want))])
				if i%(977*5) == 0 {
					time.Sleep(time.Millisecond)
				}
			}
			client.Close()
		}()
		_ = server.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(bufio.NewReaderSize(rr, 4096))
		if err != nil {
			t.Fatalf("after %d bytes: %v (a timeout means the end of the stream was missed)", len(got), err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("read %d of %d bytes intact", len(got), len(want))
		}
	}
}

// A read deadline interrupts a waiting raw read with a timeout, as the
// relay's interrupts need, and reading goes on afterwards.
func TestRawReaderHonoursTheReadDeadline(t *testing.T) {
	t.Parallel()
	client, server := tcpPair(t)
	rr := WithRawIO(server)
	_ = server.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := rr.Read(make([]byte, 8)); !IsTimeout(err) {
		t.Fatalf("Read = %v, want a timeout", err)
	}
	_ = server.SetReadDeadline(time.Time{})
	_, _ = client.Write([]byte("x"))
	b := make([]byte, 8)
	if n, err := rr.Read(b); err != nil || string(b[:n]) != "x" {
		t.Fatalf("Read after the deadline: %q %v", b[:n], err)
	}
	client.Close()
	if _, err := rr.Read(b); !errors.Is(err, io.EOF) {
		t.Fatalf("Read after close: %v, want EOF", err)
	}
}

// The raw write path delivers everything to a reader, and a peer that takes
// nothing makes it fail with a timeout.
func TestDeadlineWriterRawPath(t *testing.T) {
	t.Parallel()
	client, server := tcpPair(t)
	dw := NewDeadlineWriter(WithRawIO(server), 200*time.Millisecond)
	want := bytes.Repeat([]byte("y"), 1<<20)
	done := make(chan []byte)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(client, int64(len(want))))
		done <- b
	}()
	if n, err := dw.Write(want); err != nil || n != len(want) {
		t.Fatalf("Write = %d, %v", n, err)
	}
	if got := <-done; !bytes.Equal(got, want) {
		t.Fatalf("peer read %d of %d bytes", len(got), len(want))
	}
	// Now the peer reads nothing: the socket buffers fill and the write times out.
	_, err := dw.Write(bytes.Repeat([]byte("z"), 64<<20))
	if !IsTimeout(err) {
		t.Fatalf("writing to a peer that reads nothing: %v, want a timeout", err)
	}
}

// A message relayed over real sockets — written by DeadlineWriter, read by
// rawReader — allocates nothing: the relay's steady state must not.
func TestRawIODoesNotAllocate(t *testing.T) {
	client, server := tcpPair(t)
	w := bufio.NewWriterSize(NewDeadlineWriter(WithRawIO(client), time.Minute), 4096)
	r := bufio.NewReaderSize(WithRawIO(server), 4096)
	fc := FrameCopier{Src: r, Dst: bufio.NewWriterSize(io.Discard, 4096)}
	msg := messages(t)
	allocs := testing.AllocsPerRun(200, func() {
		if _, err := w.Write(msg); err != nil {
			t.Fatal(err)
		}
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		for range 3 {
			if _, _, _, err := fc.Next(); err != nil {
				t.Fatal(err)
			}
		}
	})
	if allocs != 0 {
		t.Fatalf("a message through the raw socket path allocates %.1f times; the relay must not", allocs)
	}
}

// BenchmarkRelayOverSockets is one small message through real sockets, as the
// relay moves it: written by DeadlineWriter, read by rawReader, copied by the
// frame copier.
func BenchmarkRelayOverSockets(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			b.Cleanup(func() { c.Close() })
			_, _ = io.Copy(c, c) // echo
		}
	}()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	raw := WithRawIO(client)
	w := bufio.NewWriterSize(NewDeadlineWriter(raw, time.Minute), 4096)
	r := bufio.NewReaderSize(raw, 4096)
	fc := FrameCopier{Src: r, Dst: bufio.NewWriterSize(io.Discard, 4096)}
	msg := messages(b)
	b.ReportAllocs()
	for b.Loop() {
		_, _ = w.Write(msg)
		if err := w.Flush(); err != nil {
			b.Fatal(err)
		}
		for range 3 {
			if _, _, _, err := fc.Next(); err != nil {
				b.Fatal(err)
			}
		}
	}
}
