package testenv

import (
	"net"
	"sync"
)

// Forwarder relays TCP connections from a loopback listener to a target, and
// can break the connections it carries the two ways a network breaks: Cut
// resets them (both peers see an error at once), Stall stops moving their
// bytes while keeping both sockets open (the peers see nothing, as when a
// route or a firewall drops packets). Connections accepted later are relayed
// normally. It stands between pgwarden and PostgreSQL in tests.
type Forwarder struct {
	// Addr is the listener's host:port.
	Addr string

	target string
	ln     net.Listener

	mu    sync.Mutex
	pairs map[*fwdPair]struct{} // guarded by mu; open connections, stalled or not
}

type fwdPair struct {
	f              *Forwarder
	client, server net.Conn
	stalled        chan struct{} // closed by Stall
	done           chan struct{} // closed by close
	stallOnce      sync.Once
	closeOnce      sync.Once
}

// StartForwarder listens on 127.0.0.1 and relays each connection to target.
func StartForwarder(target string) (*Forwarder, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	f := &Forwarder{Addr: ln.Addr().String(), target: target, ln: ln, pairs: map[*fwdPair]struct{}{}}
	go f.accept()
	return f, nil
}

// Port is the listener's port.
func (f *Forwarder) Port() int { return f.ln.Addr().(*net.TCPAddr).Port }

func (f *Forwarder) accept() {
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", f.target)
		if err != nil {
			c.Close()
			continue
		}
		p := &fwdPair{f: f, client: c, server: s, stalled: make(chan struct{}), done: make(chan struct{})}
		f.mu.Lock()
		f.pairs[p] = struct{}{}
		f.mu.Unlock()
		go p.pipe(s, c)
		go p.pipe(c, s)
	}
}

// pipe copies src to dst until either side ends, then closes the pair. Once
// the pair stalls it reads nothing more (what it had read is lost, as on a
// dead route) and waits for the pair to be closed.
func (p *fwdPair) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-p.stalled:
			<-p.done
			return
		default:
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				err = werr
			}
		}
		if err != nil {
			p.close()
			return
		}
	}
}

// close resets both sockets (RST, not FIN) and forgets the pair.
func (p *fwdPair) close() {
	p.closeOnce.Do(func() {
		for _, c := range []net.Conn{p.client, p.server} {
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.SetLinger(0)
			}
			c.Close()
		}
		close(p.done)
		p.f.mu.Lock()
		delete(p.f.pairs, p)
		p.f.mu.Unlock()
	})
}

func (f *Forwarder) snapshot() []*fwdPair {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]*fwdPair, 0, len(f.pairs))
	for p := range f.pairs {
		out = append(out, p)
	}
	return out
}

// Conns is the number of connections open now, stalled ones included.
func (f *Forwarder) Conns() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.pairs)
}

// Cut resets every connection open now.
func (f *Forwarder) Cut() {
	for _, p := range f.snapshot() {
		p.close()
	}
}

// Stall stops moving bytes on every connection open now, both ways, without
// closing anything.
func (f *Forwarder) Stall() {
	for _, p := range f.snapshot() {
		p.stallOnce.Do(func() { close(p.stalled) })
	}
}

// Close stops listening and resets every connection.
func (f *Forwarder) Close() {
	f.ln.Close()
	f.Cut()
}
