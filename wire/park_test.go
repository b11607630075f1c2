//go:build linux

package wire

import (
	"errors"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func newParker(t *testing.T) *Parker {
	t.Helper()
	p, err := NewParker()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// woken returns a wake function and a channel that gets one value per call.
func woken() (func(), chan struct{}) {
	ch := make(chan struct{}, 4)
	return func() { ch <- struct{}{} }, ch
}

func waitWake(t *testing.T, ch chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: not woken", what)
	}
}

func TestParkWakesWhenReadable(t *testing.T) {
	p := newParker(t)
	client, server := tcpPair(t)
	wake, ch := woken()
	// Parked again and again, as an idle client is between requests.
	for i := range 3 {
		pk, err := p.Park(WithRawIO(server).(syscall.Conn), wake)
		if err != nil {
			t.Fatal(err)
		}
		if p.Waiting() != 1 {
			t.Fatalf("round %d: %d waiting, want 1", i, p.Waiting())
		}
		if _, err := client.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		waitWake(t, ch, "readable")
		if pk.Wake() {
			t.Fatal("Wake after the event ran wake a second time")
		}
		buf := make([]byte, 1)
		if _, err := server.Read(buf); err != nil || buf[0] != byte(i) {
			t.Fatalf("read after wake: %v %v", buf, err)
		}
	}
	if p.Waiting() != 0 {
		t.Fatalf("%d still waiting", p.Waiting())
	}
}

func TestParkWakeFirstRunsOnce(t *testing.T) {
	p := newParker(t)
	client, server := tcpPair(t)
	var calls atomic.Int32
	done := make(chan struct{}, 4)
	pk, err := p.Park(server.(*net.TCPConn), func() { calls.Add(1); done <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	if !pk.Wake() {
		t.Fatal("Wake on a parked connection did nothing")
	}
	waitWake(t, done, "Wake")
	// The registration is still armed: data now must not run wake again.
	if _, err := client.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if pk.Wake() {
		t.Fatal("second Wake ran wake again")
	}
	// Park again: the same socket, re-armed under a new id, fires at once
	// for the byte already there.
	if _, err := p.Park(server.(*net.TCPConn), func() { calls.Add(1); done <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	waitWake(t, done, "data already there")
	if n := calls.Load(); n != 2 {
		t.Fatalf("wake ran %d times, want 2", n)
	}
}

func TestParkHangUpWakes(t *testing.T) {
	p := newParker(t)
	client, server := tcpPair(t)
	wake, ch := woken()
	if _, err := p.Park(server.(*net.TCPConn), wake); err != nil {
		t.Fatal(err)
	}
	client.Close()
	waitWake(t, ch, "peer closed")
}

func TestParkRefusesWhatItCannotWatch(t *testing.T) {
	p := newParker(t)
	_, server := tcpPair(t)
	server.Close()
	if _, err := p.Park(server.(*net.TCPConn), func() {}); !errors.Is(err, ErrNotParkable) {
		t.Fatalf("closed connection: %v, want ErrNotParkable", err)
	}
	if p.Waiting() != 0 {
		t.Fatalf("a refused park is still waiting")
	}
}

func TestParkerCloseWakesTheParked(t *testing.T) {
	p, err := NewParker()
	if err != nil {
		t.Fatal(err)
	}
	_, server := tcpPair(t)
	wake, ch := woken()
	if _, err := p.Park(server.(*net.TCPConn), wake); err != nil {
		t.Fatal(err)
	}
	p.Close()
	waitWake(t, ch, "Close")
	if _, err := p.Park(server.(*net.TCPConn), func() {}); !errors.Is(err, ErrNotParkable) {
		t.Fatalf("Park after Close: %v", err)
	}
}

// TestParkRacingClose: Close between a Park's taking the connection in and
// its epoll registration wakes it; Park must then report it parked (its wake
// owns the connection), never fail while its wake runs.
func TestParkRacingClose(t *testing.T) {
	_, server := tcpPair(t)
	p, err := NewParker()
	if err != nil {
		t.Fatal(err)
	}
	testHookParkRegistered = func(p *Parker) { p.Close() }
	defer func() { testHookParkRegistered = nil }()
	var calls atomic.Int32
	woke := make(chan struct{}, 2)
	if _, err := p.Park(server.(*net.TCPConn), func() { calls.Add(1); woke <- struct{}{} }); err != nil {
		t.Fatalf("Park woken by Close returned %v: its caller would run on beside the wake", err)
	}
	waitWake(t, woke, "Close")
	if n := calls.Load(); n != 1 {
		t.Fatalf("wake ran %d times", n)
	}
}
