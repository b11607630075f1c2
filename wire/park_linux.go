//go:build linux

package wire

import (
	"errors"
	"fmt"
	"sync"
	"syscall"
)

// Parker holds idle connections without a goroutine each: a connection
// parked is watched by one epoll instance of the Parker's own, and its wake
// function runs, once, in a new goroutine, when it becomes readable (or
// hangs up, or fails), or when Wake is called first. A client that sits idle
// for hours then costs its heap state and no stack.
//
// The connection stays registered with Go's netpoller too; reading it after
// the wake goes through the net package as usual. Registrations are one-shot
// and keyed by a number the Parker never reuses, so an event for a
// connection that was woken another way, or closed (closing a socket takes it
// out of every epoll set), finds nobody and is dropped.
type Parker struct {
	epfd   int
	stopR  int // a pipe's read end in the epoll set: Close writes to stopW
	stopW  int
	done   chan struct{}
	closed sync.Once

	// ctlMu orders epoll_ctl calls (read) before Close frees the epoll
	// descriptor (write), so a closed, reused descriptor number is never
	// used.
	ctlMu   sync.RWMutex
	stopped bool // guarded by ctlMu

	mu      sync.Mutex
	next    uint64
	waiting map[uint64]*Parked // guarded by mu
}

// Parked is one parked connection.
type Parked struct {
	p    *Parker
	id   uint64
	wake func()
}

// ErrNotParkable is returned by Park for a connection it cannot watch.
var ErrNotParkable = errors.New("wire: connection cannot be parked")

var errParkerClosed = errors.New("the parker is closed")

// testHookParkRegistered runs in Park between taking the connection in and
// arming the epoll registration: tests close the Parker there.
var testHookParkRegistered func(*Parker)

const stopID = 0

// NewParker starts a Parker's poller goroutine.
func NewParker() (*Parker, error) {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("wire: epoll_create1: %w", err)
	}
	var fds [2]int
	if err := syscall.Pipe2(fds[:], syscall.O_CLOEXEC|syscall.O_NONBLOCK); err != nil {
		syscall.Close(epfd)
		return nil, fmt.Errorf("wire: pipe2: %w", err)
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: stopID}
	if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, fds[0], &ev); err != nil {
		syscall.Close(epfd)
		syscall.Close(fds[0])
		syscall.Close(fds[1])
		return nil, fmt.Errorf("wire: epoll_ctl: %w", err)
	}
	p := &Parker{epfd: epfd, stopR: fds[0], stopW: fds[1], done: make(chan struct{}), next: stopID,
		waiting: map[uint64]*Parked{}}
	go p.poll()
	return p, nil
}

// Park watches conn until it is readable, then runs wake in a new goroutine.
// The caller must not read conn until wake runs: until then the Parked owns
// it. conn must be a plain socket (TLS buffers plaintext the socket does not
// show); anything else gets ErrNotParkable, as does a closed connection, and
// the caller keeps reading it itself.
func (p *Parker) Park(conn syscall.Conn, wake func()) (*Parked, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNotParkable, err)
	}
	pk := &Parked{p: p, wake: wake}
	p.mu.Lock()
	if p.waiting == nil {
		p.mu.Unlock()
		return nil, fmt.Errorf("%w: the parker is closed", ErrNotParkable)
	}
	p.next++
	pk.id = p.next
	p.waiting[pk.id] = pk
	p.mu.Unlock()

	if testHookParkRegistered != nil {
		testHookParkRegistered(p)
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT,
		Fd: int32(uint32(pk.id)), Pad: int32(uint32(pk.id >> 32))}
	cerr := errParkerClosed
	// Inside Control the descriptor cannot be closed under us, and under
	// ctlMu (read) neither can the epoll set. A socket parked before is
	// still in the set, disarmed: re-arm it with the new id.
	p.ctlMu.RLock()
	if !p.stopped {
		err = rc.Control(func(fd uintptr) {
			cerr = syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_MOD, int(fd), &ev)
			if cerr == syscall.ENOENT {
				cerr = syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_ADD, int(fd), &ev)
			}
		})
	}
	p.ctlMu.RUnlock()
	if err == nil {
		err = cerr
	}
	if err != nil {
		p.mu.Lock()
		_, still := p.waiting[pk.id]
		delete(p.waiting, pk.id)
		p.mu.Unlock()
		if !still {
			// Close woke it meanwhile: the wake function owns the
			// connection now, so for the caller it is parked.
			return pk, nil
		}
		return nil, fmt.Errorf("%w: %w", ErrNotParkable, err)
	}
	return pk, nil
}

// Wake runs the parked connection's wake function now, in a new goroutine,
// unless it has run or is running already. It reports whether it did. Safe
// from any goroutine, any number of times.
func (pk *Parked) Wake() bool {
	if pk == nil {
		return false
	}
	return pk.p.fire(pk.id)
}

// fire hands the connection id back to its owner, once.
func (p *Parker) fire(id uint64) bool {
	p.mu.Lock()
	pk, ok := p.waiting[id]
	delete(p.waiting, id)
	p.mu.Unlock()
	if ok {
		go pk.wake()
	}
	return ok
}

// Waiting is how many connections are parked now.
func (p *Parker) Waiting() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.waiting)
}

func (p *Parker) poll() {
	defer close(p.done)
	events := make([]syscall.EpollEvent, 128)
	for {
		n, err := syscall.EpollWait(p.epfd, events, -1)
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			// Not expected; the parked are woken so none is stranded.
			p.wakeAll()
			return
		}
		for _, ev := range events[:n] {
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			if id == stopID {
				p.wakeAll()
				return
			}
			p.fire(id)
		}
	}
}

// wakeAll wakes every parked connection and refuses new ones.
func (p *Parker) wakeAll() {
	p.mu.Lock()
	all := p.waiting
	p.waiting = nil
	p.mu.Unlock()
	for _, pk := range all {
		go pk.wake()
	}
}

// Close stops the poller; connections still parked are woken (their owners
// find them as they are: readable or not, closed or not).
func (p *Parker) Close() error {
	p.closed.Do(func() {
		_, _ = syscall.Write(p.stopW, []byte{1})
		<-p.done
		p.ctlMu.Lock()
		p.stopped = true
		p.ctlMu.Unlock()
		syscall.Close(p.epfd)
		syscall.Close(p.stopR)
		syscall.Close(p.stopW)
	})
	return nil
}
