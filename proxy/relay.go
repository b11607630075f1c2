package proxy

import (
	"errors"
	"net"
	"sync/atomic"
	"time"

	"github.com/pgwarden/pgwarden/pgerror"
)

// relayResult is how a session ended.
type relayResult struct {
	reusable          bool // the upstream is idle and clean: it may go back to the pool
	why               string
	bytesIn, bytesOut int64
	statements        int64
}

// relayState is what the two directions share. Counters are atomics: each
// is written by one goroutine and read by the other at the end.
type relayState struct {
	syncsSent  atomic.Int64  // Query, Sync and FunctionCall sent: each earns one ReadyForQuery
	readyRecv  atomic.Int64  // ReadyForQuery received
	unsynced   atomic.Bool   // extended-protocol messages sent since the last Sync
	txStatus   atomic.Uint32 // status byte of the last ReadyForQuery
	stopping   atomic.Bool   // the client side ended; the server side should stop
	retiring   atomic.Bool   // the credential's RetireAt passed: end at the next idle point
	statements atomic.Int64
	bytesIn    atomic.Int64
	bytesOut   atomic.Int64
}

// idle reports whether the upstream has answered everything and sits outside
// a transaction.
func (st *relayState) idle() bool {
	return st.syncsSent.Load() == st.readyRecv.Load() && !st.unsynced.Load() && st.txStatus.Load() == 'I'
}

type end struct {
	why   string
	clean bool // stopped between messages, nothing half-read
}

// relay copies frames both ways until either side ends, one goroutine per
// direction. Only this session's two goroutines touch the sockets; the first
// to finish makes the other return (the client side by closing the client,
// the server side by a read deadline, so an idle upstream survives for reuse).
func (c *clientConn) relay(up *serverConn) relayResult {
	st := &relayState{}
	st.txStatus.Store('I')
	cfg := &c.srv.cfg

	// The credential's lease bounds the session: at RetireAt the session ends
	// at its next idle point; at the lease's end it is cut.
	now := cfg.Now()
	soft := time.AfterFunc(up.cred.RetireAt.Sub(now), func() {
		st.retiring.Store(true)
		_ = up.conn.SetReadDeadline(time.Now())
	})
	defer soft.Stop()
	hard := time.AfterFunc(up.cred.ExpiresAt.Sub(now), func() {
		c.kill()
		up.close()
	})
	defer hard.Stop()

	fromClient := make(chan end, 1)
	fromServer := make(chan end, 1)
	go func() { fromClient <- c.clientToServer(up, st) }()
	go func() { fromServer <- c.serverToClient(up, st) }()

	res := relayResult{}
	select {
	case e := <-fromClient:
		st.stopping.Store(true)
		_ = up.conn.SetReadDeadline(time.Now())
		s := <-fromServer
		_ = up.conn.SetReadDeadline(time.Time{})
		res.why = e.why
		res.reusable = e.clean && s.clean && st.idle() && !st.retiring.Load()
	case s := <-fromServer:
		c.kill()
		<-fromClient
		res.why = s.why
	}
	res.bytesIn, res.bytesOut, res.statements = st.bytesIn.Load(), st.bytesOut.Load(), st.statements.Load()
	return res
}

// clientToServer forwards the client's messages. It stops without forwarding
// Terminate, so the upstream session can be pooled.
func (c *clientConn) clientToServer(up *serverConn, st *relayState) end {
	for {
		hdr, err := c.r.Peek(1)
		if err != nil {
			return end{why: "client disconnected", clean: c.r.Buffered() == 0 && len(hdr) == 0}
		}
		if hdr[0] == 'X' {
			return end{why: "client terminated", clean: true}
		}
		typ, _, n, err := copyFrame(up.w, c.r)
		if err != nil {
			if errors.Is(err, errFraming) {
				return end{why: "client protocol violation"}
			}
			return end{why: "client disconnected mid-message"}
		}
		st.bytesIn.Add(int64(n))
		switch typ {
		case 'Q':
			st.syncsSent.Add(1)
			st.statements.Add(1)
		case 'F':
			st.syncsSent.Add(1)
		case 'S':
			st.syncsSent.Add(1)
			st.unsynced.Store(false)
		case 'E':
			st.statements.Add(1)
			st.unsynced.Store(true)
		case 'P', 'B', 'D', 'C', 'H':
			st.unsynced.Store(true)
		}
		if c.r.Buffered() == 0 {
			if err := up.w.Flush(); err != nil {
				return end{why: "upstream write failed"}
			}
		}
	}
}

// serverToClient forwards the server's messages, watching ReadyForQuery.
func (c *clientConn) serverToClient(up *serverConn, st *relayState) end {
	for {
		typ, status, n, err := copyFrame(c.w, up.r)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				clean := up.r.Buffered() == 0
				if st.stopping.Load() {
					return end{why: "stopped", clean: clean}
				}
				if st.retiring.Load() && clean && st.idle() {
					return c.endRetired()
				}
				_ = up.conn.SetReadDeadline(time.Time{})
				continue
			}
			if st.stopping.Load() {
				return end{why: "stopped"}
			}
			_ = c.w.Flush()
			return end{why: "upstream closed"}
		}
		st.bytesOut.Add(int64(n))
		if typ == 'Z' {
			st.txStatus.Store(uint32(status))
			st.readyRecv.Add(1)
		}
		if up.r.Buffered() == 0 {
			if err := c.w.Flush(); err != nil {
				return end{why: "client write failed"}
			}
			if typ == 'Z' && status == 'I' && st.retiring.Load() && st.idle() {
				return c.endRetired()
			}
		}
	}
}

// endRetired tells the client its session ended because its credential's
// lease is ending; a reconnect gets fresh credentials.
func (c *clientConn) endRetired() end {
	_ = sendFatal(c.w, pgerror.New(pgerror.CredentialLeaseEnded,
		"terminating connection because its database credential is expiring").
		WithHint("Reconnect: the new session gets fresh credentials."))
	return end{why: "credential retired"}
}
