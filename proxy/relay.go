package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/pgerror"
	"github.com/pgwarden/pgwarden/pool"
	"github.com/pgwarden/pgwarden/wire"
)

// cutGrace is how long a session cut at its lease's end has to send the
// client its FATAL before both sockets are closed regardless.
const cutGrace = 2 * time.Second

// relayResult is how a session ended.
type relayResult struct {
	reusable          bool // the upstream is idle and clean: it may go back to the pool
	why               string
	bytesIn, bytesOut int64
	statements, xacts int64
}

// relayState is what the two directions and the session's timers share.
// Counters are atomics: each is written by one goroutine and read by others.
type relayState struct {
	syncsSent atomic.Int64  // Query, Sync and FunctionCall sent: each earns one ReadyForQuery
	readyRecv atomic.Int64  // ReadyForQuery received
	unsynced  atomic.Bool   // extended-protocol messages sent since the last Sync
	txStatus  atomic.Uint32 // status byte of the last ReadyForQuery
	stopping  atomic.Bool   // the client side ended; the server side should stop
	retiring  atomic.Bool   // the credential retired, or the token expired: end at the next idle point
	cut       atomic.Bool   // the credential's lease ended, or the token's grace: end now
	// tokenExpired: retiring or cut because the client's token expired.
	tokenExpired atomic.Bool
	noticeDue    atomic.Bool // the client is owed a NOTICE that its token expires soon
	// After the client's RESET ALL or DISCARD ALL, pgwarden sets the
	// identity again before the client's next message (reapply); the
	// replies to that query, the swallow-th sync point, are not forwarded.
	reapply       bool // the client-to-server goroutine's own
	reapplyAtSync bool // ditto: an extended-protocol RESET ALL or DISCARD ALL awaits its Sync
	swallow       atomic.Int64
	statements    atomic.Int64
	xacts         atomic.Int64 // ReadyForQuery 'I': transactions ended
	bytesIn       atomic.Int64
	bytesOut      atomic.Int64
}

// idle reports whether the upstream has answered everything and sits outside
// a transaction.
func (st *relayState) idle() bool {
	return st.syncsSent.Load() == st.readyRecv.Load() && !st.unsynced.Load() && st.txStatus.Load() == 'I'
}

// end is how one direction of the relay stopped.
type end struct {
	why string
	// clean: stopped between messages with nothing of the next one read, so
	// the stream it read from is intact.
	clean bool
	// upstreamFailed: PostgreSQL's side broke (closed, or took no bytes
	// within the write timeout).
	upstreamFailed bool
	// For the server-to-client direction: whether the client's stream is
	// between messages (so pgwarden may still add one), whether the last
	// message it got was an ErrorResponse, and a FATAL to send it.
	boundary  bool
	lastError bool
	notify    error
}

// relay copies messages both ways until either side ends, one goroutine per
// direction; the caller's goroutine waits for both.
//
// Writers: during the relay the client socket is written only by the
// server-to-client goroutine and the upstream only by the client-to-server
// one. A final FATAL to the client is written by the caller's goroutine, only
// after the server-to-client goroutine has returned, and only if the client's
// stream is between messages.
//
// Stopping: the client side is stopped by closing the client socket (kill).
// The server side is interrupted by a read deadline on the upstream socket,
// after a flag that says why (stopping, retiring, cut); the frame copier
// resumes where the deadline caught it, so an interrupt never costs the
// stream its place, and an idle upstream survives for reuse.
func (c *clientConn) relay(up *pool.Server) relayResult {
	st := &relayState{}
	st.txStatus.Store('I')
	cfg := &c.srv.cfg

	// The credential's lease bounds the session, and its owner (the broker)
	// says when: once it retires the session ends at its next idle point;
	// once it ends the session is cut. The client's token bounds it too: a
	// NOTICE a while before it expires, the end at the next idle point after,
	// a cut when the grace for an open transaction is over.
	//
	// These callbacks run on timer goroutines and may come late: once the
	// relay is over (the session may be another client's by then) they do
	// nothing.
	var over atomic.Bool
	defer over.Store(true)
	interrupt := func(flag *atomic.Bool) func() {
		return func() {
			if over.Load() {
				return
			}
			flag.Store(true)
			_ = up.Conn.SetReadDeadline(time.Now())
		}
	}
	// A session stuck writing to a peer that reads nothing cannot say goodbye.
	backstop := time.AfterFunc(time.Duration(math.MaxInt64), func() {
		if !over.Load() {
			c.kill()
			up.Close()
		}
	})
	defer backstop.Stop()
	cutNow := func(flag *atomic.Bool) func() {
		f := interrupt(flag)
		return func() {
			if !over.Load() {
				f()
				backstop.Reset(cutGrace)
			}
		}
	}
	defer up.Cred.OnRetire(interrupt(&st.retiring))()
	defer up.Cred.OnEnd(cutNow(&st.cut))()
	if exp := c.id.Expiry; !exp.IsZero() {
		now := cfg.Now()
		if !c.noticeSent {
			notice := time.AfterFunc(exp.Add(-cfg.TokenExpiryNotice).Sub(now), interrupt(&st.noticeDue))
			defer notice.Stop()
		}
		expired := time.AfterFunc(exp.Sub(now), func() { st.tokenExpired.Store(true); interrupt(&st.retiring)() })
		defer expired.Stop()
		cut := time.AfterFunc(exp.Add(cfg.TokenExpiryGrace).Sub(now), func() { st.tokenExpired.Store(true); cutNow(&st.cut)() })
		defer cut.Stop()
	}

	fromClient := make(chan end, 1)
	fromServer := make(chan end, 1)
	go func() { fromClient <- c.clientToServer(up, st) }()
	go func() { fromServer <- c.serverToClient(up, st) }()

	res := relayResult{}
	select {
	case e := <-fromClient:
		if !e.upstreamFailed && e.notify == nil {
			c.kill() // the client is done: nothing may block writing to it
		}
		st.stopping.Store(true)
		_ = up.Conn.SetReadDeadline(time.Now())
		s := <-fromServer
		_ = up.Conn.SetReadDeadline(time.Time{})
		res.why = e.why
		res.reusable = e.clean && s.clean && !s.upstreamFailed && st.idle() && !st.retiring.Load() && !st.cut.Load()
		switch {
		case e.notify != nil && s.boundary:
			c.sendFinal(e.notify)
		case e.upstreamFailed && s.boundary && !s.lastError:
			c.sendFinal(errUpstreamLost)
		}
	case s := <-fromServer:
		if s.notify != nil && s.boundary {
			c.sendFinal(s.notify)
		}
		c.kill()
		up.Close() // never reused after this; unblocks a write to it
		<-fromClient
		res.why = s.why
	}
	res.bytesIn, res.bytesOut, res.statements, res.xacts = st.bytesIn.Load(), st.bytesOut.Load(), st.statements.Load(), st.xacts.Load()
	return res
}

// errUpstreamLost is what a client is told when PostgreSQL's side of its
// session breaks without a word of its own.
var errUpstreamLost = pgerror.New(pgerror.ConnectionFailure, "connection to the database server was lost").
	WithHint("Reconnect. Work not committed is lost; if a COMMIT was in flight, check whether it took effect.")

// finalWriteTimeout bounds the last message to a client whose session ends.
const finalWriteTimeout = 5 * time.Second

// sendFinal writes a FATAL to the client, within finalWriteTimeout (or the
// write timeout, if shorter). The caller closes the connection afterwards.
func (c *clientConn) sendFinal(err error) {
	c.dw.SetLimit(time.Now().Add(finalWriteTimeout))
	_ = sendFatal(c.w, err)
}

// clientToServer forwards the client's messages. It stops without forwarding
// Terminate, so the upstream session can be pooled.
func (c *clientConn) clientToServer(up *pool.Server, st *relayState) end {
	fc := wire.FrameCopier{Src: c.r, Dst: up.W}
	for {
		if fc.AtBoundary() {
			hdr, err := c.r.Peek(1)
			if err != nil {
				return end{why: "client disconnected", clean: c.r.Buffered() == 0 && len(hdr) == 0}
			}
			// Not inside a COPY's data, and not while the last such query
			// is unanswered (one is swallowed at a time).
			if st.reapply && hdr[0] != 'X' && hdr[0] != 'd' && hdr[0] != 'c' && hdr[0] != 'f' && st.swallow.Load() <= st.readyRecv.Load() {
				st.reapply = false
				if _, err := up.W.Write(c.identityQuery()); err != nil {
					return upstreamWriteFailed(err)
				}
				st.swallow.Store(st.syncsSent.Add(1))
			}
			if hdr[0] == 'X' {
				// What came before it (a COMMIT, say) goes out first:
				// PostgreSQL runs it before it sees the connection close.
				if err := up.W.Flush(); err != nil {
					return upstreamWriteFailed(err)
				}
				return end{why: "client terminated", clean: true}
			}
			if hdr[0] == 'Q' || hdr[0] == 'P' {
				if e, stop := c.screenToServer(up, st); stop {
					return e
				}
				continue
			}
			if hdr[0] == 'F' {
				if call, err := c.r.Peek(wire.HeaderLen + 4); err == nil && forgedCall(call) {
					return end{why: "client called set_config by FunctionCall", notify: errForged}
				}
			}
		}
		typ, _, n, err := fc.Next()
		if err != nil {
			switch {
			case errors.Is(err, wire.ErrFraming):
				return end{why: "client protocol violation"}
			case fc.WriteErr != nil:
				return upstreamWriteFailed(fc.WriteErr)
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
			if st.reapplyAtSync {
				st.reapplyAtSync, st.reapply = false, true
			}
		case 'E':
			st.statements.Add(1)
			st.unsynced.Store(true)
		case 'P', 'B', 'D', 'C', 'H':
			st.unsynced.Store(true)
		}
		if c.r.Buffered() == 0 {
			if err := up.W.Flush(); err != nil {
				return upstreamWriteFailed(err)
			}
		}
	}
}

// screenToServer forwards a whole Query or Parse after screenSQL: SQL that
// forges an identity setting goes as its refusal. It reports stop with the
// end when the session cannot go on.
func (c *clientConn) screenToServer(up *pool.Server, st *relayState) (end, bool) {
	hdr, err := c.r.Peek(wire.HeaderLen)
	if err != nil {
		return end{why: "client disconnected mid-message"}, true
	}
	size := int(binary.BigEndian.Uint32(hdr[1:])) + 1
	if size < wire.HeaderLen {
		return end{why: "client protocol violation"}, true
	}
	var msg []byte
	if size <= c.r.Size() {
		if msg, err = c.r.Peek(size); err != nil {
			return end{why: "client disconnected mid-message"}, true
		}
		defer c.r.Discard(size)
	} else {
		if size > maxRewrite {
			return end{why: "client query over pgwarden's size limit", notify: errQueryTooLarge}, true
		}
		msg = make([]byte, size)
		if _, err := io.ReadFull(c.r, msg); err != nil {
			return end{why: "client disconnected mid-message"}, true
		}
	}
	out, flags, _, err := screenSQL(msg, false)
	if err != nil {
		return end{why: "client protocol violation"}, true
	}
	switch {
	case flags&sqlResetAll == 0:
	case msg[0] == 'Q':
		st.reapply = true
	default:
		st.reapplyAtSync = true // a Parse of it: runs at the pipeline's Sync
	}
	if out == nil {
		out = msg
	}
	st.bytesIn.Add(int64(size))
	if msg[0] == 'Q' {
		st.syncsSent.Add(1)
		st.statements.Add(1)
	} else {
		st.unsynced.Store(true)
	}
	if _, err := up.W.Write(out); err != nil {
		return upstreamWriteFailed(err), true
	}
	if c.r.Buffered() == size || (size > c.r.Size() && c.r.Buffered() == 0) {
		if err := up.W.Flush(); err != nil {
			return upstreamWriteFailed(err), true
		}
	}
	return end{}, false
}

func upstreamWriteFailed(err error) end {
	if wire.IsTimeout(err) {
		return end{why: "upstream took no bytes within the write timeout", upstreamFailed: true}
	}
	return end{why: "upstream write failed", upstreamFailed: true}
}

// serverToClient forwards the server's messages, watching ReadyForQuery.
func (c *clientConn) serverToClient(up *pool.Server, st *relayState) end {
	fc := wire.FrameCopier{Src: up.R, Dst: c.w}
	lastError := false
	stop := func(e end) end {
		e.boundary, e.lastError = fc.AtBoundary(), lastError
		e.clean = e.clean && fc.AtBoundary() && up.R.Buffered() == 0
		return e
	}
	for {
		if fc.AtBoundary() {
			// The decision waits for the reply's first bytes: the query
			// may be sent while this goroutine is waiting. (Errors here
			// come again from Next, which handles them.)
			if _, err := up.R.Peek(wire.HeaderLen); err == nil && st.swallow.Load() == st.readyRecv.Load()+1 {
				fc.Skip = true // a reply to pgwarden's own identity query
			}
		}
		if fc.AtBoundary() && !fc.Skip {
			// Errors here come again from next, which handles them.
			if done, err := refusedParse(up.R, c.w); err == nil && done {
				lastError = true
				if up.R.Buffered() == 0 {
					if err := c.w.Flush(); err != nil {
						return stop(end{why: "client write failed"})
					}
				}
				continue
			}
		}
		typ, status, n, err := fc.Next()
		if err != nil {
			if fc.WriteErr != nil {
				if wire.IsTimeout(fc.WriteErr) {
					return stop(end{why: "client took no bytes within the write timeout"})
				}
				return stop(end{why: "client write failed"})
			}
			if wire.IsTimeout(err) {
				if e, done := c.interrupted(up, st, &fc); done {
					return stop(e)
				}
				continue // resume, in the middle of a message if need be
			}
			if errors.Is(err, wire.ErrFraming) {
				return stop(end{why: "upstream protocol violation", upstreamFailed: true, notify: errUpstreamLost})
			}
			if st.stopping.Load() {
				return stop(end{why: "stopped", upstreamFailed: true})
			}
			_ = c.w.Flush()
			e := end{why: "upstream closed", upstreamFailed: true}
			if !lastError {
				// PostgreSQL's last word is a FATAL ErrorResponse when it
				// ends a session itself; add one only when it said nothing.
				e.notify = errUpstreamLost
			}
			return stop(e)
		}
		st.bytesOut.Add(int64(n))
		lastError = typ == 'E'
		if st.noticeDue.Load() && st.noticeDue.CompareAndSwap(true, false) {
			c.tokenNotice()
		}
		if typ == 'Z' {
			st.txStatus.Store(uint32(status))
			st.readyRecv.Add(1)
			if status == 'I' {
				st.xacts.Add(1)
			}
		}
		if up.R.Buffered() == 0 {
			if err := c.w.Flush(); err != nil {
				if wire.IsTimeout(err) {
					return stop(end{why: "client took no bytes within the write timeout"})
				}
				return stop(end{why: "client write failed"})
			}
			if typ == 'Z' && status == 'I' && st.retiring.Load() && st.idle() {
				return stop(retiredEnd(st))
			}
			if typ == 'Z' && st.cut.Load() && st.syncsSent.Load() == st.readyRecv.Load() {
				return stop(cutEnd(st))
			}
		}
	}
}

// interrupted handles a read deadline on the upstream: it returns the end to
// report when the interrupt means the server side must stop now, or done =
// false to carry on reading. It clears the deadline before it looks at the
// flags: whoever interrupts sets its flag before the deadline, so an
// interrupt that comes after the clearing either shows in the flags or
// leaves a deadline that fires again; none is lost.
func (c *clientConn) interrupted(up *pool.Server, st *relayState, fc *wire.FrameCopier) (end, bool) {
	_ = up.Conn.SetReadDeadline(time.Time{})
	switch {
	case st.stopping.Load():
		return end{why: "stopped", clean: true}, true
	case st.cut.Load() && st.syncsSent.Load() > st.readyRecv.Load():
		// A query (a COMMIT, say) is in flight: its answer goes through
		// first, so the client learns how it ended; the backstop bounds the
		// wait (cutGrace).
	case st.cut.Load():
		return cutEnd(st), true
	case st.retiring.Load() && fc.AtBoundary() && up.R.Buffered() == 0 && st.idle():
		return retiredEnd(st), true
	}
	if fc.AtBoundary() && st.noticeDue.CompareAndSwap(true, false) {
		c.tokenNotice()
		if err := c.w.Flush(); err != nil {
			return end{why: "client write failed"}, true
		}
	}
	return end{}, false
}

// cutEnd is the end of a session cut when its lease ended or its token's
// grace ran out, between messages with no query in flight.
func cutEnd(st *relayState) end {
	if st.tokenExpired.Load() {
		return end{why: "token expired", notify: errTokenExpiredCut}
	}
	return end{why: "credential lease ended", notify: errLeaseEnded}
}

// retiredEnd is the end of a session at an idle point after its credential
// retired or its token expired.
func retiredEnd(st *relayState) end {
	if st.tokenExpired.Load() {
		return end{why: "token expired", notify: errTokenExpired}
	}
	return end{why: "credential retired", notify: errRetired}
}

// tokenNotice writes (without flushing) a NOTICE that the client's token
// expires soon. Only the server-to-client goroutine calls it, between
// messages.
func (c *clientConn) tokenNotice() {
	exp := c.id.Expiry
	n := &pgproto3.NoticeResponse{Severity: "NOTICE", SeverityUnlocalized: "NOTICE", Code: pgerror.SuccessfulCompletion,
		Message: fmt.Sprintf("your token expires at %s: this session ends at the first moment after that outside a transaction", exp.UTC().Format(time.RFC3339)),
		Hint:    "Reconnect with a fresh token to carry on; a transaction still open then has " + c.srv.cfg.TokenExpiryGrace.String() + " to finish."}
	buf, _ := n.Encode(nil)
	_, _ = c.w.Write(buf)
}

// errRetired ends a session whose credential's lease is ending, at an idle
// point; a reconnect gets fresh credentials.
var errRetired = pgerror.New(pgerror.CredentialLeaseEnded,
	"terminating connection because its database credential is expiring").
	WithHint("Reconnect: the new session gets fresh credentials.")

// errTokenExpired ends a session at an idle point after the token it
// logged in with expired. 57P01 (admin_shutdown), not 28000: drivers and
// pools treat it as "the server went away, reconnect", which is what the
// client should do, with a fresh token.
var errTokenExpired = pgerror.New(pgerror.CredentialLeaseEnded,
	"terminating connection because your token expired").
	WithHint("Reconnect with a fresh token from your identity provider.")

// errTokenExpiredCut ends a session still inside a transaction when the
// grace after its token's expiry ran out.
var errTokenExpiredCut = pgerror.New(pgerror.CredentialLeaseEnded,
	"terminating connection because your token expired and the open transaction did not finish in time").
	WithHint("Reconnect with a fresh token from your identity provider. Work not committed was rolled back.")

// errLeaseEnded ends a session still busy when its credential's lease ended.
var errLeaseEnded = pgerror.New(pgerror.CredentialLeaseEnded,
	"terminating connection because its database credential expired").
	WithHint("Reconnect: the new session gets fresh credentials. Work not committed was rolled back.")
