package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/pgerror"
	"github.com/pgwarden/pgwarden/pool"
	"github.com/pgwarden/pgwarden/wire"
)

// Transaction mode.
//
// A client in transaction mode holds a server only from the first message of
// a transaction to the ReadyForQuery 'I' that ends it, with nothing left to
// answer. Its own goroutine (run) reads its messages, attaches a server when
// one arrives and none is held, writes them upstream — rewritten where
// prepared statements, refused SQL or the identity settings need it — and,
// once a request is complete (through a Sync or a Query) and the client has
// sent nothing more, reads the replies itself (drain): it copies them to the
// client, drops those to messages pgwarden sent of its own, and gives the
// server back at the ReadyForQuery that leaves nothing outstanding, or, inside
// a transaction, keeps it and goes back to the client. No goroutine is made
// per transaction.
//
// Two cases need the server read while the client is: a COPY FROM STDIN
// (the client sends data while the server may answer), and a pipeline the
// client stopped sending without a Sync (a Flush: how many replies come is
// not known). Then a server goroutine (serverSide) reads the replies for the
// rest of the attachment and detaches itself. What both goroutines look at —
// the attached server, the counts of sync points sent and ReadyForQuery
// received, the reply queues, the client's statement names — is guarded by
// txnSession.mu; a message is counted before it is written, under the lock
// the server goroutine takes to decide a detach, and the server goroutine
// waits for the client goroutine to be out of the server's writer (wmu)
// before it gives the server back.
//
// Ownership: whoever reads the attached server owns it — it checks it in,
// resets it first when the client changed its session state, or discards it
// when the client left mid-transaction or it failed (giveBack, letGo). The
// cancel target points at the server only while attached, and is cleared
// before the server goes back, so a late cancel never reaches another
// client's query. Idle clients hold no server, no large buffer and no
// goroutine but their own, blocked reading a 512-byte buffer; a large one is
// borrowed only while a message bigger than that is copied.
type txnSession struct {
	c      *clientConn
	stats  *dbStats
	req    broker.Request
	target *cancelTarget

	small *bufio.Reader // the client's reader between messages
	big   *bufio.Reader // borrowed while a large message is copied, until drained

	// The client goroutine's own.
	cred   *broker.Credential
	offEnd func() bool // stops following cred's end
	clientSettings
	srvDone chan struct{} // closed when the last server goroutine has exited
	scratch []byte
	tokenAt [3]time.Time // the token's moments: notice, expiry, end of the grace (set before the timer)

	// wmu is held by the client goroutine while it writes a message
	// upstream; the server goroutine takes it after deciding to detach.
	wmu sync.Mutex

	mu sync.Mutex
	// Guarded by mu.
	sc          *pool.Server // attached server, or nil
	syncsSent   int64        // Query, Sync and FunctionCall sent: each earns one ReadyForQuery
	readyRecv   int64
	unsynced    bool // extended-protocol messages sent since the last Sync
	txStatus    byte
	errEpoch    int64 // the sync epoch of the last ErrorResponse to extended messages, or -1
	parseQ      []pendingReply
	closeQ      []pendingReply
	srvDirty    bool     // the attached server's session state changed: reset before reuse
	bound       []uint64 // statements bound in this attachment
	syncKinds   []byte   // Q, S or F of each sync point not yet answered, oldest first
	copyIn      bool     // COPY FROM STDIN under way
	copyEnded   bool     // the client's last Query/Execute/CopyDone/CopyFail was a CopyDone or CopyFail
	resetAtSync bool     // an extended-protocol RESET ALL or DISCARD ALL is in this pipeline
	async       bool     // a server goroutine reads the attached server (a COPY); else drain does, inline
	// The client's unnamed statement: its last unnamed Parse, its scan,
	// and whether the attached server has it.
	unnamed      []byte
	unnamedFlags sqlFlags
	unnamedHere  bool
	stmts        map[string]*pool.StmtEntry // the client's named statements
	stopping     bool                       // the client side ended
	attachedAt   time.Time
	busyFrom     time.Time // since when a reply has been outstanding

	timer      atomic.Pointer[time.Timer] // the token's; nil once stopped
	tokenStage atomic.Int32               // the token moments passed

	parkMu  sync.Mutex
	graceAt time.Time                   // when an idle client parks; zero while not idle. The client goroutine's own
	parked  atomic.Pointer[wire.Parked] // the last parking; Wake is a no-op once it has run

	swallowing   atomic.Int32 // identity queries of pgwarden's not yet answered (kind 'I' in syncKinds)
	cut          atomic.Bool  // the lease ended, or the token's grace: end now
	tokenExpired atomic.Bool
	noticeDue    atomic.Bool
	failure      atomic.Pointer[error] // why the client side failed, for the server goroutine to tell the client
	killed       atomic.Bool           // KILL, shutdown: a server read by drain is let go at once

	statements, bytesIn, bytesOut, xacts atomic.Int64
	why                                  atomic.Pointer[string]
}

// pendingReply is a Parse or Close sent upstream, waiting for its reply.
type pendingReply struct {
	epoch int64 // syncsSent when it was sent
	skip  bool  // the reply is to pgwarden's own message: not forwarded
	entry *pool.StmtEntry
	// client: the client's name for the statement a Parse prepares (the
	// client's own Parse); dirty: dropping the message unsettles the
	// server's statements (a Close pgwarden sent).
	client string
	dirty  bool
	pair   *reparse
}

// done ends a session that run returned from without parking: the audit
// record, the counters, and (when the goroutine is not serve's) the
// connection itself.
func (t *txnSession) done(why string) {
	c, cfg := t.c, &t.c.srv.cfg
	dbUser := t.cred.Username
	res := t.finish(why)
	t.stats.queries.Add(res.statements)
	t.stats.recv.Add(res.bytesIn)
	t.stats.sent.Add(res.bytesOut)
	cfg.Logger.Info("session",
		"subject", c.id.Subject, "name", c.id.Name, "remote", c.remote, "tls", c.tls,
		"database", c.database, "level", c.level, "pool_mode", c.mode, "db_user", dbUser,
		"duration", cfg.Now().Sub(c.start).Round(time.Millisecond).String(),
		"bytes_in", res.bytesIn, "bytes_out", res.bytesOut, "statements", res.statements, "end", res.why)
}

// startTxn sets a client in transaction mode up; run and finish are the
// rest.
func (c *clientConn) startTxn(up *pool.Server, req broker.Request, settings [][2]string, target *cancelTarget) *txnSession {
	t := &txnSession{c: c, stats: c.srv.statsFor(c.database), req: req, target: target, small: c.r, cred: up.Cred,
		clientSettings: newClientSettings(c, settings), stmts: map[string]*pool.StmtEntry{}, errEpoch: -1, txStatus: 'I',
		// A client just logged in parks at once, without the idle grace:
		// an application's pool opens connections and keeps most idle.
		graceAt: time.Unix(1, 0)}
	// The login's server has the client's settings (applySettings) and
	// identity already.
	up.NoteApplied(t.settings, t.idKey)
	target.set(nil)
	c.srv.pools.Checkin(up, false)

	c.dw = wire.NewDeadlineWriter(c.nc, c.srv.cfg.WriteTimeout)
	c.w.Reset(c.dw)

	t.followCred()
	// KILL closes the client's socket, which nobody reads while drain waits
	// for a long query: the server read is interrupted too.
	onKill := func() {
		t.killed.Store(true)
		t.mu.Lock()
		if t.sc != nil {
			_ = t.sc.Conn.SetReadDeadline(time.Now())
		}
		t.mu.Unlock()
		t.parked.Load().Wake() // a parked client wakes to find its socket closed
	}
	c.onKill.Store(&onKill)
	// The token bounds the session: a NOTICE a while before it expires, the
	// end at the first moment after it with no server held, a cut when the
	// grace for an open transaction is over.
	cfg := &c.srv.cfg
	if exp := c.id.Expiry; !exp.IsZero() {
		t.tokenAt = [3]time.Time{exp.Add(-cfg.TokenExpiryNotice), exp, exp.Add(cfg.TokenExpiryGrace)}
		// One timer for the three moments (an idle client's memory is
		// mostly its heap state): created stopped, published, then armed.
		tm := time.AfterFunc(time.Duration(math.MaxInt64), t.tokenTick)
		t.timer.Store(tm)
		tm.Reset(t.tokenAt[0].Sub(cfg.Now()))
	}
	return t
}

// tokenTick is the token timer's: the NOTICE, then the expiry, then the end
// of the grace, each re-arming the timer for the next.
func (t *txnSession) tokenTick() {
	switch t.tokenStage.Add(1) {
	case 1:
		t.noticeDue.Store(true)
		t.nudge()
	case 2:
		t.tokenExpired.Store(true)
		t.nudge()
	default:
		t.tokenExpired.Store(true)
		t.cutNow()
		return
	}
	if tm := t.timer.Load(); tm != nil {
		tm.Reset(t.tokenAt[t.tokenStage.Load()].Sub(t.c.srv.cfg.Now()))
		if t.timer.Load() == nil {
			tm.Stop() // finish stopped it meanwhile: it stays stopped
		}
	}
}

// finish ends the session run returned from, and reports it.
func (t *txnSession) finish(why string) relayResult {
	c := t.c
	if tm := t.timer.Swap(nil); tm != nil {
		tm.Stop()
	}
	t.offEnd()
	t.end()
	t.mu.Lock()
	for name, e := range t.stmts {
		c.srv.stmts.Release(e)
		delete(t.stmts, name)
	}
	t.mu.Unlock()
	if t.big != nil {
		t.dropBig()
	}
	if w := t.why.Load(); w != nil {
		why = *w
	}
	return relayResult{why: why, bytesIn: t.bytesIn.Load(), bytesOut: t.bytesOut.Load(), statements: t.statements.Load()}
}

// followCred arranges for the session to be cut when its credential's lease
// ends while a server is attached (detached, the next attach takes a fresh
// credential anyway).
func (t *txnSession) followCred() {
	if t.offEnd != nil {
		t.offEnd()
	}
	t.offEnd = t.cred.OnEnd(t.cutNow)
}

// cutNow ends an attached server's work now: the server goroutine stops at
// the next message boundary with no query in flight, and a backstop closes
// both sockets after cutGrace.
func (t *txnSession) cutNow() {
	t.mu.Lock()
	sc := t.sc
	if sc != nil {
		// Under mu: a server that detached meanwhile is not cut, and the
		// flag never outlives the attachment it was meant for.
		t.cut.Store(true)
		_ = sc.Conn.SetReadDeadline(time.Now())
	}
	t.mu.Unlock()
	t.nudge() // the client goroutine looks at the flags (it may hold the server, waiting for the client)
	if sc == nil {
		return
	}
	time.AfterFunc(cutGrace, func() {
		t.mu.Lock()
		same := t.sc == sc
		t.mu.Unlock()
		if same {
			t.c.kill()
			sc.Close()
		}
	})
}

// in is the reader the client's bytes come through now.
func (t *txnSession) in() *bufio.Reader {
	if t.big != nil {
		return t.big
	}
	return t.small
}

// need returns a reader that can hold size bytes at once (up to the large
// buffer's size), borrowing the large buffer when the small one cannot.
func (t *txnSession) need(size int) *bufio.Reader {
	if t.big == nil && size > t.small.Size() {
		t.big = relayReaders.Get().(*bufio.Reader)
		t.big.Reset(t.small) // reads through what small holds, then the socket
	}
	return t.in()
}

// settle gives the large buffer back once it holds nothing.
func (t *txnSession) settle() {
	if t.big != nil && t.big.Buffered() == 0 {
		t.dropBig()
	}
}

func (t *txnSession) dropBig() {
	t.big.Reset(nil)
	relayReaders.Put(t.big)
	t.big = nil
}

// run reads the client's messages until it leaves, and returns why; or,
// when the client is idle and parks, returns parked: the goroutine that
// resumes it carries on.
func (t *txnSession) run() (why string, parked bool) {
	for {
		// Idle: no large buffer is held while the next message is awaited.
		t.settle()
		if t.mayPark() {
			// Waiting for the client's next message: parked once it has
			// been idle for idleGrace. A busy client (its next message
			// within the grace) keeps its goroutine, as parking costs
			// system calls and a goroutine per message. A client in a
			// transaction (a server goroutine holds its server) is looked
			// at again every idleGrace: it parks once the transaction has
			// ended, whoever ended it.
			now := time.Now()
			switch {
			case t.graceAt.IsZero():
				t.graceAt = now.Add(idleGrace)
				t.idleDeadline()
			case !now.Before(t.graceAt):
				t.graceAt = time.Time{}
				if sock, ok := t.parkable(); ok && t.park(sock) {
					return "", true
				}
				t.graceAt = now.Add(idleGrace)
				t.idleDeadline()
			default:
				t.idleDeadline() // a nudge's deadline was cleared
			}
		}
		_, _ = t.in().Peek(wire.HeaderLen)
		if !t.graceAt.IsZero() && t.in().Buffered() > 0 {
			t.graceAt = time.Time{}
			_ = t.c.nc.SetReadDeadline(time.Time{})
		}
		if why, done := t.step(); done {
			return why, false
		}
	}
}

// idleDeadline sets the read deadline at the end of the idle grace, unless
// a nudge came meanwhile: then at once, as the nudge did.
func (t *txnSession) idleDeadline() {
	_ = t.c.nc.SetReadDeadline(t.graceAt)
	if t.flagged() {
		_ = t.c.nc.SetReadDeadline(time.Now())
	}
}

// idleGrace is how long a transaction-mode client is idle before it parks.
const idleGrace = 250 * time.Millisecond

// Parking.
//
// An idle client — no server attached, nothing buffered either way, no
// flag to act on — parks: its small buffers go back to their pools and the
// Server's Parker watches its socket; its goroutine ends. When the client
// sends, hangs up, or is nudged (a timer, a lease cut, KILL, shutdown), the
// Parker starts a goroutine in resume, which takes buffers again and
// carries on in run. The txnSession is owned by exactly one goroutine at a
// time: the one running run, or, while parked, the Parker (Parked.Wake runs
// resume at most once). TLS clients do not park: crypto/tls may hold
// plaintext the socket no longer shows.

var (
	smallReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, handshakeBufSize) }}
	smallWriters = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, handshakeBufSize) }}
)

// flagged reports whether a timer, a cut or KILL wants the client
// goroutine's attention.
func (t *txnSession) flagged() bool {
	return t.killed.Load() || t.cut.Load() || t.tokenExpired.Load() || t.noticeDue.Load()
}

// nudge makes the client goroutine look at the flags: a read deadline in the
// past when it is reading, a wake when it is parked. The flag is set first.
func (t *txnSession) nudge() {
	_ = t.c.nc.SetReadDeadline(time.Now())
	t.parked.Load().Wake()
}

// mayPark reports whether the client goroutine is about to wait for the
// client's next message with nothing buffered either way and no flag to act
// on, on a connection the Parker could watch.
func (t *txnSession) mayPark() bool {
	c := t.c
	return c.srv.parker != nil && !c.tls && t.big == nil && t.small.Buffered() == 0 && c.w.Buffered() == 0 && !t.flagged()
}

// parkable reports whether the client is idle with nothing to act on — no
// server attached, nothing buffered either way, no flag — on a socket the
// Parker can watch.
func (t *txnSession) parkable() (syscall.Conn, bool) {
	c := t.c
	if !t.mayPark() {
		return nil, false
	}
	sock, ok := c.raw.(syscall.Conn)
	if !ok {
		return nil, false
	}
	t.mu.Lock()
	idle := t.sc == nil && !t.stopping
	t.mu.Unlock()
	return sock, idle
}

// park parks a parkable client, and reports whether it did; the caller's
// goroutine then owns nothing of the session and returns.
func (t *txnSession) park(sock syscall.Conn) bool {
	c, p := t.c, t.c.srv.parker
	_ = c.nc.SetReadDeadline(time.Time{})
	t.small.Reset(nil)
	smallReaders.Put(t.small)
	c.w.Reset(nil)
	smallWriters.Put(c.w)
	t.small, c.r, c.w = nil, nil, nil
	// parkMu keeps resume from running on before t.parked names this
	// parking, so a nudge never wakes a stale one.
	t.parkMu.Lock()
	pk, err := p.Park(sock, t.resume)
	if err == nil {
		t.parked.Store(pk)
	}
	t.parkMu.Unlock()
	if err != nil {
		t.takeBuffers()
		return false
	}
	if t.flagged() {
		pk.Wake() // a flag set before t.parked was published
	}
	return true
}

// takeBuffers gives a client back the small buffers park returned.
func (t *txnSession) takeBuffers() {
	c := t.c
	t.small = smallReaders.Get().(*bufio.Reader)
	t.small.Reset(c.nc)
	c.r = t.small
	c.w = smallWriters.Get().(*bufio.Writer)
	c.w.Reset(c.dw)
}

// resume runs a parked client again, in the goroutine the Parker started.
func (t *txnSession) resume() {
	t.parkMu.Lock()
	//lint:ignore SA2001 an empty critical section: wait for park to publish t.parked
	t.parkMu.Unlock()
	t.takeBuffers()
	if t.flagged() {
		_ = t.c.nc.SetReadDeadline(time.Now()) // park cleared the deadline a nudge may have set
	}
	why, parked := t.run()
	if parked {
		return
	}
	t.done(why)
	t.c.close()
}

// step handles the client's next message, and returns done when the session
// must end.
func (t *txnSession) step() (why string, done bool) {
	r := t.in()
	hdr, err := r.Peek(wire.HeaderLen)
	if err != nil {
		if wire.IsTimeout(err) {
			if why, done := t.poked(); done {
				return why, true
			}
			return "", false
		}
		if len(hdr) == 0 && r.Buffered() == 0 {
			return "client disconnected", true
		}
		return "client disconnected mid-message", true
	}
	typ := hdr[0]
	n := int(binary.BigEndian.Uint32(hdr[1:])) - 4
	if n < 0 {
		return "client protocol violation", true
	}
	if typ == 'X' {
		// What came before it (a COMMIT, say) goes out first:
		// PostgreSQL runs it before it sees the connection close.
		t.wmu.Lock()
		if sc := t.upstream(); sc != nil {
			_ = sc.W.Flush()
		}
		t.wmu.Unlock()
		return "client terminated", true
	}
	if !frontendMessage(typ) {
		if t.upstream() != nil {
			return t.forwardFailed(errUnexpectedMessage), true
		}
		t.refuse(errUnexpectedMessage)
		return "client protocol violation", true
	}
	// A message that fits the large buffer arrives whole before a
	// server is taken for it: a client that trickles a message holds
	// no server meanwhile.
	size := n + wire.HeaderLen
	if size > clientBufSize {
		size = wire.HeaderLen + min(n, 4) // enough for a FunctionCall's function
	}
	msg, err := t.peekWhole(size)
	if err != nil {
		if why, done := t.readFailed(err); done {
			return why, true
		}
		return "", false
	}
	if typ == 'F' && forgedCall(msg) {
		if t.upstream() != nil {
			return t.forwardFailed(errForged), true
		}
		t.refuse(errForged)
		return "client protocol violation", true
	}
	if t.owedInline() {
		// The client sends more while replies are owed: it pipelines.
		// Forwarding while nobody reads the server could fill both
		// sockets; a goroutine reads it from here on.
		if sc := t.upstream(); sc != nil {
			t.goAsync(sc)
		}
	}
	sc, err := t.count(typ)
	if err != nil {
		if t.upstream() != nil {
			return t.forwardFailed(err), true // the server goroutine writes to the client
		}
		t.refuse(err)
		return reasonOf(err), true
	}
	if sc == nil {
		// A copy message outside COPY: PostgreSQL ignores it too.
		if err := t.copyRaw(typ, n, true); err != nil {
			return "client disconnected mid-message", true
		}
		return "", false
	}
	t.bytesIn.Add(int64(n + wire.HeaderLen))
	// The server goroutine may decide to detach as soon as the last
	// bytes are out and answered; it waits for wmu before it gives the
	// server back, so this goroutine is out of sc's writer by then.
	t.wmu.Lock()
	err = t.forward(typ, n)
	if err == nil && t.in().Buffered() == 0 && t.upstream() == sc {
		err = sc.W.Flush()
	}
	t.wmu.Unlock()
	if cap(t.scratch) > 64<<10 {
		t.scratch = nil // a large Parse or Bind is not kept for the session's life
	}
	if err != nil {
		return t.forwardFailed(err), true
	}
	if t.in().Buffered() == 0 {
		switch t.pending() {
		case pendingComplete:
			return t.drain(sc)
		case pendingOpen:
			// A pipeline the client stopped sending without a Sync (a
			// Flush, say): how many replies come is not known, so a
			// server goroutine reads them for the rest of the attachment.
			t.goAsync(sc)
		}
	}
	return "", false
}

// What the attached server owes, for step.
const (
	pendingNone     = iota
	pendingComplete // replies to requests that end with a Sync or a Query
	pendingOpen     // extended-protocol messages with no Sync yet
)

// pending says what the attached server owes when no server goroutine
// reads it.
func (t *txnSession) pending() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.sc == nil || t.async:
		return pendingNone
	case t.unsynced:
		return pendingOpen
	case t.syncsSent > t.readyRecv:
		return pendingComplete
	}
	return pendingNone
}

// owedInline reports whether the attached server owes replies and no
// server goroutine reads it.
func (t *txnSession) owedInline() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.sc != nil && !t.async && t.syncsSent > t.readyRecv
}

// goAsync hands the attached server's replies to a goroutine of their own
// until the server is given back.
func (t *txnSession) goAsync(sc *pool.Server) {
	t.mu.Lock()
	t.async = true
	t.mu.Unlock()
	done := make(chan struct{})
	t.srvDone = done
	go t.serverSide(sc, done)
}

// drain reads the attached server's replies in the client's goroutine
// (no goroutine per transaction) until they are all in: then the server is
// given back, or, inside a transaction, kept for the client's next message.
// A COPY that needs the client's data hands the server side to a goroutine
// of its own (serverSide) for the rest of the attachment.
func (t *txnSession) drain(sc *pool.Server) (string, bool) {
	w := relayWriters.Get().(*bufio.Writer)
	w.Reset(t.c.dw)
	defer func() {
		w.Reset(nil)
		relayWriters.Put(w)
	}()
	e := t.serverLoop(sc, w, true)
	switch {
	case e.copyStarted:
		t.goAsync(sc)
		return "", false
	case e.pause:
		// Inside a transaction: the client may think for a while, and
		// the server must still be watched (it may end the session:
		// idle_in_transaction_session_timeout, a shutdown; the lease may
		// be cut). A goroutine reads it until the transaction ends.
		t.goAsync(sc)
		return "", false
	case e.detached:
		t.giveBack(sc, e.dirty)
		if t.tokenExpired.Load() || t.noticeDue.Load() {
			return t.poked()
		}
		return "", false
	}
	t.letGo(sc, e, w)
	if e.why == "" {
		e.why = "ended"
	}
	return e.why, true
}

// frontendMessage reports whether typ is a message a client may send after
// its startup. Anything else would make PostgreSQL end the session — with
// the server perhaps handed to another client by then — so pgwarden ends
// the client's instead.
func frontendMessage(typ byte) bool {
	switch typ {
	case 'Q', 'P', 'B', 'D', 'E', 'C', 'H', 'S', 'F', 'd', 'c', 'f':
		return true
	}
	return false
}

var errUnexpectedMessage = pgerror.New(pgerror.ProtocolViolation, "unexpected message type from the client")

// peekWhole waits until size bytes of the client's stream are buffered,
// riding out pokes.
func (t *txnSession) peekWhole(size int) ([]byte, error) {
	r := t.need(size)
	for {
		b, err := r.Peek(size)
		if err == nil || !wire.IsTimeout(err) {
			return b, err
		}
		if t.upstream() == nil {
			return nil, err // idle: the poke may be for this goroutine
		}
		_ = t.c.nc.SetReadDeadline(time.Time{})
	}
}

// readFailed handles a failed read of the client's next message: a poke
// (done = false: carry on) or the client gone.
func (t *txnSession) readFailed(err error) (string, bool) {
	if wire.IsTimeout(err) {
		return t.poked()
	}
	return "client disconnected mid-message", true
}

// reasonOf is the audit's end reason for a refusal at attach.
func reasonOf(err error) string {
	switch {
	case errors.Is(err, errTokenExpired):
		return "token expired"
	case pgerror.Code(err) == pgerror.TooManyConnections:
		return "no upstream connection in time"
	}
	return "could not attach an upstream connection"
}

// forwardFailed ends the session after a message could not be forwarded:
// the client vanished mid-message (nothing to tell it), sent something
// malformed, or the write upstream failed. The server goroutine tells the
// client, at a message boundary of its stream.
func (t *txnSession) forwardFailed(err error) string {
	var fe *frameErr
	if errors.As(err, &fe) {
		return "client disconnected mid-message"
	}
	notify, why := error(errUpstreamLost), "upstream write failed"
	var pe *pgerror.Error
	if errors.Is(err, wire.ErrFraming) {
		notify, why = errMalformed, "client protocol violation"
	} else if errors.As(err, &pe) {
		notify, why = pe, "client protocol violation"
	}
	t.mu.Lock()
	sc, async := t.sc, t.async
	t.mu.Unlock()
	if sc != nil && !async {
		// No server goroutine: this one tells the client, between its
		// messages as it is.
		w := relayWriters.Get().(*bufio.Writer)
		w.Reset(t.c.dw)
		t.letGo(sc, srvEnd{why: why, notify: notify, boundary: true}, w)
		w.Reset(nil)
		relayWriters.Put(w)
		return why
	}
	t.failure.Store(&notify)
	if sc != nil {
		_ = sc.Conn.SetReadDeadline(time.Now())
	}
	return why
}

// frameErr marks a read from the client failing (the client is gone), as
// against a write upstream.
type frameErr struct {
	client bool
	err    error
}

func (e *frameErr) Error() string { return e.err.Error() }
func (e *frameErr) Unwrap() error { return e.err }

// upstream is the attached server; only the client goroutine, between
// count and the end of the message, may rely on it staying attached.
func (t *txnSession) upstream() *pool.Server {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.sc
}

// poked handles a read deadline set by a timer: a NOTICE due, the token
// expired, the lease cut. It returns done when the session must end.
func (t *txnSession) poked() (string, bool) {
	_ = t.c.nc.SetReadDeadline(time.Time{})
	t.mu.Lock()
	sc, async := t.sc, t.async
	t.mu.Unlock()
	if sc != nil && async {
		return "", false // the server goroutine pokes again when it detaches
	}
	if sc != nil {
		// Inside a transaction, waiting for the client: nothing is in
		// flight. A cut ends it now; an expired token waits for the grace.
		if t.cut.Load() {
			e := srvEnd{why: "credential lease ended", notify: errLeaseEnded, boundary: true}
			if t.tokenExpired.Load() {
				e = srvEnd{why: "token expired", notify: errTokenExpiredCut, boundary: true}
			}
			w := relayWriters.Get().(*bufio.Writer)
			w.Reset(t.c.dw)
			t.letGo(sc, e, w)
			w.Reset(nil)
			relayWriters.Put(w)
			return e.why, true
		}
		if t.noticeDue.CompareAndSwap(true, false) {
			t.c.tokenNotice()
			if err := t.c.w.Flush(); err != nil {
				return "client write failed", true
			}
		}
		return "", false
	}
	if t.tokenExpired.Load() {
		t.refuse(errTokenExpired)
		return "token expired", true
	}
	if t.noticeDue.CompareAndSwap(true, false) {
		t.c.tokenNotice()
		if err := t.c.w.Flush(); err != nil {
			return "client write failed", true
		}
	}
	return "", false
}

// refuse sends the client a FATAL; only while no server goroutine runs.
func (t *txnSession) refuse(err error) {
	t.c.sendFinal(err)
}

// count attaches a server when none is held and counts typ before it is
// written, and returns the server. It returns nil for a copy message with
// no COPY under way (dropped, as PostgreSQL would ignore it).
func (t *txnSession) count(typ byte) (*pool.Server, error) {
	copyMsg := typ == 'd' || typ == 'c' || typ == 'f'
	t.mu.Lock()
	if copyMsg && (t.sc == nil || !t.copyIn && t.syncsSent == t.readyRecv && !t.unsynced) {
		t.mu.Unlock()
		return nil, nil
	}
	if t.sc == nil {
		t.mu.Unlock()
		if err := t.attach(); err != nil {
			return nil, err
		}
		t.mu.Lock()
	}
	if t.sc.Identity != t.idKey && !copyMsg && !t.copyIn {
		// The client's RESET ALL or DISCARD ALL cleared the identity
		// settings: set again before its next message (never inside a
		// COPY's data); its replies, a sync point of kind 'I', are not
		// forwarded.
		if _, err := t.sc.W.Write(t.c.identityQuery()); err != nil {
			t.mu.Unlock()
			return nil, pool.UpstreamFailure(err)
		}
		t.syncsSent++
		t.syncKinds = append(t.syncKinds, 'I')
		t.swallowing.Add(1)
		t.sc.Identity = t.idKey
	}
	switch typ {
	case 'c', 'f':
		t.copyEnded = true
	case 'Q', 'E':
		t.copyEnded = false
	}
	if t.copyIn {
		switch typ {
		case 'c', 'f':
			t.copyIn = false
		case 'S', 'H':
			// PostgreSQL ignores them in COPY FROM STDIN: not counted.
			sc := t.sc
			t.mu.Unlock()
			return sc, nil
		}
	}
	if (typ == 'Q' || typ == 'F' || typ == 'S') && t.syncsSent == t.readyRecv {
		t.busyFrom = time.Now() // for SHOW STATS' query time
	}
	switch {
	case typ == 'S' && !t.copyEnded:
		// A Sync after an Execute: PostgreSQL ignores it if that Execute
		// turns out to start a COPY FROM STDIN (see inspect, 'G').
		t.syncKinds = append(t.syncKinds, 's')
	case typ == 'Q' || typ == 'F' || typ == 'S':
		t.syncKinds = append(t.syncKinds, typ)
	}
	switch typ {
	case 'Q':
		t.syncsSent++
		t.statements.Add(1)
	case 'F':
		t.syncsSent++
	case 'S':
		t.syncsSent++
		t.unsynced = false
		if t.resetAtSync {
			t.resetAtSync = false
			t.sc.Applied, t.sc.Identity = nil, "" // set again before the next message
		}
	case 'E':
		t.statements.Add(1)
		t.unsynced = true
	case 'P', 'B', 'D', 'C', 'H':
		t.unsynced = true
	}
	sc := t.sc
	t.mu.Unlock()
	return sc, nil
}

// attach takes a server for the client's next transaction: under a fresh
// credential if its own retired, with the client's settings and identity
// applied, and starts the server goroutine.
func (t *txnSession) attach() error {
	if t.srvDone != nil {
		<-t.srvDone // the last server is back in the pool
		t.srvDone = nil
	}
	if t.tokenExpired.Load() {
		return errTokenExpired
	}
	if t.noticeDue.CompareAndSwap(true, false) {
		t.c.tokenNotice()
		if err := t.c.w.Flush(); err != nil {
			return err
		}
	}
	c := t.c
	ps := c.srv.pools
	// Each step bounds itself: the wait (AcquireTimeout), opening a server
	// (DialTimeout), Vault (AuthTimeout), the settings (apply).
	ctx := context.Background()
	sc, cred, err := c.acquire(ctx, t.req, t.cred, t.stats)
	if cred != t.cred {
		t.cred = cred
		t.followCred()
	}
	if err != nil {
		return err
	}
	if err := t.apply(ctx, c, sc); err != nil {
		ps.Discard(sc)
		return pool.UpstreamFailure(err)
	}
	t.mu.Lock()
	t.sc = sc
	t.syncsSent, t.readyRecv, t.unsynced, t.txStatus, t.errEpoch = 0, 0, false, 'I', -1
	t.parseQ, t.closeQ, t.bound, t.unnamedHere = t.parseQ[:0], t.closeQ[:0], t.bound[:0], false
	t.syncKinds, t.copyIn = t.syncKinds[:0], false
	t.srvDirty, t.attachedAt = false, time.Now()
	t.cut.Store(false)
	t.swallowing.Store(0)
	t.async = false
	t.mu.Unlock()
	t.target.set(sc)
	sc.Client.Store(c.cid)
	c.attached.Store(sc)
	c.lastReq.Store(t.attachedAt.UnixNano())
	return nil // the replies are read by drain, in this goroutine, until a COPY needs one of its own
}

// paramValue is the server's reported value of a setting, whatever the case
// of its name.
func paramValue(params map[string]string, lower string) string {
	if v, ok := params[lower]; ok {
		return v
	}
	for k, v := range params {
		if strings.EqualFold(k, lower) {
			return v
		}
	}
	return "\x00unknown"
}

// writeSetConfig writes one SELECT of set_config calls, names and values as
// literals, so no client input is parsed as SQL.
func writeSetConfig(b *strings.Builder, sets [][2]string) {
	if len(sets) == 0 {
		b.WriteString("SELECT")
		return
	}
	for i, kv := range sets {
		if i == 0 {
			b.WriteString("SELECT ")
		} else {
			b.WriteString(", ")
		}
		b.WriteString("pg_catalog.set_config(")
		b.WriteString(pool.QuoteLiteral(kv[0]))
		b.WriteString(", ")
		b.WriteString(pool.QuoteLiteral(kv[1]))
		b.WriteString(", false)")
	}
}

// forward writes one client message upstream, rewritten where needed.
func (t *txnSession) forward(typ byte, n int) error {
	switch typ {
	case 'Q':
		return t.query(n)
	case 'P':
		return t.parse(n)
	case 'B':
		return t.bind(n)
	case 'D', 'C':
		return t.describeOrClose(typ, n)
	}
	return t.copyRaw(typ, n, false)
}

// copyRaw copies (or, with drop, skips) one message as it is.
func (t *txnSession) copyRaw(typ byte, n int, drop bool) error {
	r := t.need(min(n+wire.HeaderLen, clientBufSize))
	var dst *bufio.Writer
	if sc := t.upstream(); sc != nil {
		dst = sc.W
	}
	fc := wire.FrameCopier{Src: r, Dst: dst, Skip: drop || dst == nil}
	for {
		_, _, _, err := fc.Next()
		if err == nil {
			return nil
		}
		if fc.WriteErr != nil {
			return fc.WriteErr
		}
		if wire.IsTimeout(err) {
			_ = t.c.nc.SetReadDeadline(time.Time{}) // a poke: carry on, in the middle of the message
			continue
		}
		if errors.Is(err, wire.ErrFraming) {
			return err
		}
		return &frameErr{client: true, err: err}
	}
}

// maxRewrite bounds a Query or Parse that pgwarden reads whole to look at
// its SQL (PostgreSQL's own limit is 1 GB); a larger one ends the session
// with errQueryTooLarge.
const maxRewrite = 256 << 20

var errQueryTooLarge = pgerror.Newf(pgerror.ProgramLimitExceeded, "query text over pgwarden's limit of %d MiB", maxRewrite>>20).
	WithHint("Send large data as parameters (extended protocol) or with COPY.")

// whole returns the client's next message, header included: aliasing the
// reader's buffer (call done to consume it) or, when larger than the
// buffer, read into memory of its own.
func (t *txnSession) whole(n int) (msg []byte, done func(), err error) {
	size := n + wire.HeaderLen
	if size <= clientBufSize {
		r := t.need(size)
		for {
			msg, err = r.Peek(size)
			if err == nil {
				return msg, func() { _, _ = r.Discard(size) }, nil
			}
			if !wire.IsTimeout(err) {
				return nil, nil, &frameErr{client: true, err: err}
			}
			_ = t.c.nc.SetReadDeadline(time.Time{})
		}
	}
	if size > maxRewrite {
		return nil, nil, errQueryTooLarge
	}
	msg = make([]byte, size)
	r := t.need(clientBufSize)
	for got := 0; got < size; {
		m, err := r.Read(msg[got:])
		got += m
		if err != nil {
			if wire.IsTimeout(err) {
				_ = t.c.nc.SetReadDeadline(time.Time{})
				continue
			}
			return nil, nil, &frameErr{client: true, err: err}
		}
	}
	return msg, func() {}, nil
}

// writeUp writes pgwarden's bytes upstream.
func (t *txnSession) writeUp(b []byte) error {
	_, err := t.upstream().W.Write(b)
	return err
}

// query forwards a simple Query, after looking at its SQL.
func (t *txnSession) query(n int) error {
	msg, done, err := t.whole(n)
	if err != nil {
		return err
	}
	defer done()
	refused, flags, dealloc, err := screenSQL(msg, true)
	if err != nil {
		return err
	}
	if refused != nil {
		return t.writeUp(refused)
	}
	t.mu.Lock()
	sc := t.sc
	if flags&sqlDiscardAll != 0 {
		t.dropStmtsLocked()
		sc.Stmts().Clear()
	}
	if flags&sqlResetAll != 0 {
		sc.Applied, sc.Identity = nil, "" // settings reset: set again before the next message
	}
	if flags&sqlDeallocate != 0 {
		if e := t.stmts[dealloc]; e != nil && dealloc != "" {
			delete(t.stmts, dealloc)
			t.c.srv.stmts.Release(e)
			sc.Stmts().Clear()
			t.srvDirty = true // should DEALLOCATE ALL fail, the cache is wrong: reset
			t.mu.Unlock()
			// The server knows the statement by another name: drop them
			// all there (they are re-prepared as needed).
			return t.writeUp(t.queryMsg("DEALLOCATE ALL"))
		}
		if dealloc == "" {
			t.dropStmtsLocked()
			sc.Stmts().Clear()
		}
	}
	if flags&sqlSession != 0 {
		t.srvDirty = true
	}
	t.mu.Unlock()
	return t.writeUp(msg)
}

// dropStmtsLocked forgets every statement name of the client.
func (t *txnSession) dropStmtsLocked() {
	for name, e := range t.stmts {
		t.c.srv.stmts.Release(e)
		delete(t.stmts, name)
	}
}

// queryMsg encodes a Query into the scratch buffer.
func (t *txnSession) queryMsg(sql string) []byte {
	t.scratch, _ = (&pgproto3.Query{String: sql}).Encode(t.scratch[:0])
	return t.scratch
}

// cstring splits a NUL-terminated string off b.
func cstring(b []byte) (s, rest []byte, ok bool) {
	i := bytes.IndexByte(b, 0)
	if i < 0 {
		return nil, nil, false
	}
	return b[:i], b[i+1:], true
}

var errMalformed = pgerror.New(pgerror.ProtocolViolation, "malformed message from the client")

// parse forwards a Parse: a named statement under its server-side name.
func (t *txnSession) parse(n int) error {
	msg, done, err := t.whole(n)
	if err != nil {
		return err
	}
	defer done()
	refused, flags, _, err := screenSQL(msg, true)
	if err != nil {
		return err
	}
	if refused != nil {
		// The statement is made of the refusal: it raises the error when
		// executed, with the parameter types the client declared.
		msg = refused
	}
	name, key, ok := cstring(msg[wire.HeaderLen:])
	if !ok {
		return errMalformed
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if flags&sqlSession != 0 {
		t.srvDirty = true
	}
	if flags&sqlResetAll != 0 {
		t.resetAtSync = true // the identity is set again after the Sync that runs it
	}
	epoch := t.syncsSent
	if len(name) == 0 {
		// The unnamed statement is the client's until its next unnamed
		// Parse, across transactions: kept, to prepare it again on the
		// server its Bind lands on.
		t.unnamed = append(t.unnamed[:0], msg...)
		t.unnamedFlags, t.unnamedHere = flags, true
		t.pushLocked(&t.parseQ, pendingReply{epoch: epoch})
		return t.writeUpLocked(msg)
	}
	if t.stmts[string(name)] == nil && len(t.stmts) >= maxClientStatements {
		// Refused in its place among the replies: an unnamed Parse of the
		// marker fails, and the server side turns the failure into the
		// refusal. (The server's unnamed statement goes with it.)
		var p pgproto3.Parse
		p.Query = refusalMarkers[errTooManyStatements]
		out, _ := p.Encode(t.scratch[:0])
		t.scratch = out
		t.unnamedHere = false
		t.pushLocked(&t.parseQ, pendingReply{epoch: epoch})
		return t.writeUpLocked(out)
	}
	cache := t.sc.Stmts()
	e := t.c.srv.stmts.Acquire(key, uint16(flags))
	if cache.Has(e) && slices.Contains(t.bound, e.ID) {
		// Prepared there, and a portal of this transaction may use it:
		// closing it would close the portal. This Parse gets a statement
		// of its own.
		t.c.srv.stmts.Release(e)
		e = t.c.srv.stmts.Private(key, uint16(flags))
	}
	if old := t.stmts[string(name)]; old != nil {
		t.c.srv.stmts.Release(old)
	}
	t.stmts[string(name)] = e
	out := t.scratch[:0]
	var pair *reparse
	if cache.Has(e) {
		// Prepared there already: close it first, so the client gets
		// PostgreSQL's own answer to its Parse.
		pair = &reparse{}
		out = appendClose(out, 'S', e.Name)
		t.pushLocked(&t.closeQ, pendingReply{epoch: epoch, skip: true, pair: pair})
	} else if ev := cache.Add(e, t.inUse); ev != nil {
		out = appendClose(out, 'S', ev.Name)
		t.pushLocked(&t.closeQ, pendingReply{epoch: epoch, skip: true, dirty: true})
	}
	out = append(out, e.Parse...)
	t.scratch = out
	t.pushLocked(&t.parseQ, pendingReply{epoch: epoch, entry: e, client: string(name), pair: pair})
	return t.writeUpLocked(out)
}

// inUse reports whether e was bound in this attachment (a portal may still
// use it), so the LRU does not close it now.
func (t *txnSession) inUse(e *pool.StmtEntry) bool { return slices.Contains(t.bound, e.ID) }

// reparse pairs the Close and the Parse sent for a statement the server
// already had: if the server skips both (an error before them), it still
// has the statement.
type reparse struct{ closeDropped bool }

// ensureUnnamedLocked makes the server's unnamed statement the client's
// before a Bind or Describe of it: its last unnamed Parse again, or, when it
// made none, a Close of whatever another client left there.
func (t *txnSession) ensureUnnamedLocked(out []byte) []byte {
	if t.unnamedHere {
		return out
	}
	t.unnamedHere = true
	epoch := t.syncsSent
	if len(t.unnamed) == 0 {
		t.pushLocked(&t.closeQ, pendingReply{epoch: epoch, skip: true})
		return appendClose(out, 'S', "")
	}
	if t.unnamedFlags&sqlSession != 0 {
		t.srvDirty = true
	}
	t.pushLocked(&t.parseQ, pendingReply{epoch: epoch, skip: true})
	return append(out, t.unnamed...)
}

// writeUpLocked writes to the attached server under mu (its buffer takes
// the bytes; a flush happens outside).
func (t *txnSession) writeUpLocked(b []byte) error {
	_, err := t.sc.W.Write(b)
	return err
}

// pushLocked queues a reply expected, unless the server skips the message
// (an ErrorResponse came in its epoch): then it is dropped at once.
func (t *txnSession) pushLocked(q *[]pendingReply, p pendingReply) {
	if p.epoch == t.errEpoch {
		t.droppedLocked(p)
		return
	}
	*q = append(*q, p)
}

// droppedLocked undoes what a message the server will never answer meant to
// do.
func (t *txnSession) droppedLocked(p pendingReply) {
	if p.pair != nil && p.entry == nil {
		p.pair.closeDropped = true // the Close of a re-Parse: the server keeps the statement
	}
	if p.entry != nil && !(p.pair != nil && p.pair.closeDropped) {
		t.sc.Stmts().Remove(p.entry)
		if p.client != "" && t.stmts[p.client] == p.entry {
			delete(t.stmts, p.client)
			t.c.srv.stmts.Release(p.entry)
		}
	}
	if p.dirty {
		t.srvDirty = true
	}
}

// ensureLocked puts a Parse for e in front of the next message when the
// server lacks it, its reply not forwarded.
func (t *txnSession) ensureLocked(out []byte, e *pool.StmtEntry) []byte {
	if sqlFlags(e.Flags)&sqlResetAll != 0 {
		t.resetAtSync = true
	}
	if sqlFlags(e.Flags)&sqlSession != 0 {
		t.srvDirty = true // it changes session state each time it runs
	}
	if !slices.Contains(t.bound, e.ID) {
		t.bound = append(t.bound, e.ID)
	}
	cache := t.sc.Stmts()
	if cache.Has(e) {
		return out
	}
	epoch := t.syncsSent
	if ev := cache.Add(e, t.inUse); ev != nil {
		out = appendClose(out, 'S', ev.Name)
		t.pushLocked(&t.closeQ, pendingReply{epoch: epoch, skip: true, dirty: true})
	}
	out = append(out, e.Parse...)
	t.pushLocked(&t.parseQ, pendingReply{epoch: epoch, skip: true, entry: e})
	return out
}

// bind forwards a Bind, naming the statement as the server knows it. The
// parameters are streamed, whatever their size.
func (t *txnSession) bind(n int) error {
	r := t.need(min(n+wire.HeaderLen, clientBufSize))
	var head []byte
	for {
		var err error
		head, err = r.Peek(min(n+wire.HeaderLen, r.Size()))
		if err == nil {
			break
		}
		if !wire.IsTimeout(err) {
			return &frameErr{client: true, err: err}
		}
		_ = t.c.nc.SetReadDeadline(time.Time{})
	}
	portal, rest, ok := cstring(head[wire.HeaderLen:])
	stmt, _, ok2 := cstring(rest)
	if !ok || !ok2 {
		if n+wire.HeaderLen > r.Size() {
			return pgerror.New(pgerror.ProgramLimitExceeded, "Bind with names longer than pgwarden reads")
		}
		return errMalformed
	}
	if len(stmt) == 0 {
		t.mu.Lock()
		out := t.ensureUnnamedLocked(t.scratch[:0])
		t.scratch = out
		err := t.writeUpLocked(out)
		t.mu.Unlock()
		if err != nil {
			return err
		}
		return t.copyRaw('B', n, false)
	}
	t.mu.Lock()
	e := t.stmts[string(stmt)]
	if e == nil {
		t.mu.Unlock()
		return t.copyRaw('B', n, false) // PostgreSQL answers "does not exist"
	}
	out := t.ensureLocked(t.scratch[:0], e)
	prefix := len(portal) + 1 + len(stmt) + 1
	restLen := n - prefix
	out = append(out, 'B', 0, 0, 0, 0)
	binary.BigEndian.PutUint32(out[len(out)-4:], uint32(4+len(portal)+1+len(e.Name)+1+restLen))
	out = append(out, portal...)
	out = append(out, 0)
	out = append(out, e.Name...)
	out = append(out, 0)
	t.scratch = out
	err := t.writeUpLocked(out)
	t.mu.Unlock()
	if err != nil {
		return err
	}
	_, _ = r.Discard(wire.HeaderLen + prefix)
	fc := wire.FrameCopier{Src: r, Dst: t.upstream().W}
	fc.Body('B', restLen)
	for !fc.AtBoundary() {
		if _, _, _, err := fc.Next(); err != nil {
			if fc.WriteErr != nil {
				return fc.WriteErr
			}
			if wire.IsTimeout(err) {
				_ = t.c.nc.SetReadDeadline(time.Time{})
				continue
			}
			return &frameErr{client: true, err: err}
		}
	}
	return nil
}

// describeOrClose forwards a Describe or Close: of a named statement, under
// its server-side name (Describe), or not at all (Close: the server keeps
// it for others; a Close of a name that never exists goes instead, so the
// client still gets PostgreSQL's CloseComplete in order).
func (t *txnSession) describeOrClose(typ byte, n int) error {
	msg, done, err := t.whole(n)
	if err != nil {
		return err
	}
	defer done()
	body := msg[wire.HeaderLen:]
	if len(body) < 2 {
		return errMalformed
	}
	name, _, ok := cstring(body[1:])
	if !ok {
		return errMalformed
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	epoch := t.syncsSent
	if body[0] != 'S' || len(name) == 0 {
		out := t.scratch[:0]
		switch {
		case typ == 'C' && body[0] == 'S':
			t.unnamed, t.unnamedHere = t.unnamed[:0], true // closed: the client has none now
		case typ == 'D' && body[0] == 'S':
			out = t.ensureUnnamedLocked(out)
		}
		if typ == 'C' {
			t.pushLocked(&t.closeQ, pendingReply{epoch: epoch})
		}
		out = append(out, msg...)
		t.scratch = out
		return t.writeUpLocked(out)
	}
	e := t.stmts[string(name)]
	if typ == 'C' {
		if e != nil {
			delete(t.stmts, string(name))
			t.c.srv.stmts.Release(e)
		}
		t.pushLocked(&t.closeQ, pendingReply{epoch: epoch})
		t.scratch = appendClose(t.scratch[:0], 'S', "pgwarden_closed")
		return t.writeUpLocked(t.scratch)
	}
	if e == nil {
		return t.writeUpLocked(msg) // PostgreSQL answers "does not exist"
	}
	out := t.ensureLocked(t.scratch[:0], e)
	out = append(out, 'D', 0, 0, 0, 0, 'S')
	binary.BigEndian.PutUint32(out[len(out)-5:], uint32(4+1+len(e.Name)+1))
	out = append(out, e.Name...)
	out = append(out, 0)
	t.scratch = out
	return t.writeUpLocked(out)
}

// appendClose appends a Close of (kind, name).
func appendClose(b []byte, kind byte, name string) []byte {
	b = append(b, 'C', 0, 0, 0, 0, kind)
	binary.BigEndian.PutUint32(b[len(b)-5:], uint32(4+1+len(name)+1))
	b = append(b, name...)
	return append(b, 0)
}

// end stops the client side: an attached server's goroutine is stopped, and
// the server discarded (the client left inside a transaction, or with
// replies outstanding). It waits for the server goroutine.
func (t *txnSession) end() {
	t.mu.Lock()
	t.stopping = true
	sc, async := t.sc, t.async
	t.mu.Unlock()
	if sc != nil && !async {
		// Held by this goroutine, inside a transaction or with replies
		// outstanding: closed, never pooled.
		w := relayWriters.Get().(*bufio.Writer)
		w.Reset(t.c.dw)
		t.letGo(sc, srvEnd{clientStopped: true}, w)
		w.Reset(nil)
		relayWriters.Put(w)
		return
	}
	if sc != nil {
		_ = sc.Conn.SetReadDeadline(time.Now())
	}
	if t.srvDone != nil {
		<-t.srvDone
		t.srvDone = nil
	}
}

// serverSide runs one attachment's server goroutine; see txnSession.
func (t *txnSession) serverSide(sc *pool.Server, done chan struct{}) {
	defer close(done)
	w := relayWriters.Get().(*bufio.Writer)
	w.Reset(t.c.dw)
	defer func() {
		w.Reset(nil)
		relayWriters.Put(w)
	}()
	e := t.serverLoop(sc, w, false)
	if e.detached {
		t.wmu.Lock() // the client goroutine is out of sc's writer
		t.wmu.Unlock()
		t.giveBack(sc, e.dirty)
		if t.tokenExpired.Load() || t.noticeDue.Load() {
			t.nudge() // the client goroutine acts on it
		}
		return
	}
	t.letGo(sc, e, w)
}

// giveBack returns a detached server to the pool (reset first when the
// client changed its session state). The holder calls it, once.
func (t *txnSession) giveBack(sc *pool.Server, dirty bool) {
	ps := t.c.srv.pools
	t.c.attached.Store(nil)
	sc.Client.Store(0)
	t.stats.xacts.Add(1)
	t.stats.xactTime.Add(int64(time.Since(t.attachedAt)))
	t.target.set(nil) // waits for a cancel in flight to land first
	if dirty {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := sc.Reset(ctx)
		cancel()
		if err != nil {
			ps.Discard(sc)
			return
		}
	}
	ps.Checkin(sc, false)
}

// letGo ends the session's hold on sc for good: the client is told why
// (when e says so and its stream is between messages), the server closed,
// the client's connection too unless the client side ended first.
func (t *txnSession) letGo(sc *pool.Server, e srvEnd, w *bufio.Writer) {
	ps := t.c.srv.pools
	t.c.attached.Store(nil)
	sc.Client.Store(0)
	if e.notify != nil && e.boundary {
		// Before t.sc is cleared: until then the client goroutine writes
		// nothing to the client of its own.
		w.Flush()
		t.c.dw.SetLimit(time.Now().Add(finalWriteTimeout))
		_ = sendFatal(w, e.notify)
	}
	t.mu.Lock()
	t.sc = nil
	t.mu.Unlock()
	t.target.set(nil)
	if e.why != "" {
		t.why.Store(&e.why)
	}
	ps.Discard(sc)
	if !e.clientStopped {
		t.c.kill()
	}
}

// srvEnd is how an attachment ended.
type srvEnd struct {
	pause         bool // inline: answered, the server stays attached (a transaction is open), back to the client
	copyStarted   bool // inline: a COPY wants the client's data: a server goroutine carries on
	detached      bool // the server is idle and clean: back to the pool
	dirty         bool // ... after a reset
	clientStopped bool // the client side ended first
	why           string
	notify        error // a FATAL for the client
	boundary      bool  // the client's stream is between messages
}

// serverLoop copies the attached server's replies to w until a detach point
// or the end.
func (t *txnSession) serverLoop(sc *pool.Server, w *bufio.Writer, inline bool) srvEnd {
	fc := wire.FrameCopier{Src: sc.R, Dst: w}
	lastError := false
	for {
		if fc.AtBoundary() && t.swallowing.Load() > 0 && t.answeringIdentity(sc) {
			fc.Skip = true
		} else if fc.AtBoundary() {
			skip, replaced, err := t.inspect(sc, w)
			if err != nil {
				if e, done := t.serverReadFailed(sc, &fc, err, lastError); done {
					return e
				}
				continue
			}
			if replaced {
				lastError = true
				continue
			}
			fc.Skip = skip
		}
		skipping := fc.Skip
		typ, status, n, err := fc.Next()
		if err != nil {
			if fc.WriteErr != nil {
				return srvEnd{why: "client write failed", boundary: false}
			}
			if e, done := t.serverReadFailed(sc, &fc, err, lastError); done {
				return e
			}
			continue
		}
		if !skipping {
			t.bytesOut.Add(int64(n))
			lastError = typ == 'E'
		}
		if typ == 'Z' {
			t.mu.Lock()
			t.readyRecv++
			t.txStatus = status
			t.copyIn = false // no COPY goes on past a ReadyForQuery
			if n := len(t.syncKinds); n > 0 {
				if t.syncKinds[0] == 'I' {
					t.swallowing.Add(-1)
				}
				copy(t.syncKinds, t.syncKinds[1:]) // a few at most: no ring needed
				t.syncKinds = t.syncKinds[:n-1]
			}
			if t.readyRecv == t.syncsSent {
				t.stats.queryTime.Add(int64(time.Since(t.busyFrom)))
			}
			if status == 'I' {
				t.xacts.Add(1)
			}
			t.mu.Unlock()
		}
		if inline && (typ == 'G' || typ == 'W') && !skipping {
			// COPY FROM STDIN (or both ways): the client must be read
			// while the server is; a goroutine of its own takes over.
			if err := w.Flush(); err != nil {
				return srvEnd{why: "client write failed"}
			}
			return srvEnd{pause: true, copyStarted: true}
		}
		if sc.R.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				return srvEnd{why: "client write failed"}
			}
			t.mu.Lock()
			answered := t.syncsSent > 0 && t.syncsSent == t.readyRecv && !t.unsynced && !t.copyIn
			if !t.stopping && !t.cut.Load() && answered && t.txStatus == 'I' {
				t.sc = nil
				dirty := t.srvDirty
				t.mu.Unlock()
				return srvEnd{detached: true, dirty: dirty}
			}
			t.mu.Unlock()
			if inline && answered {
				return srvEnd{pause: true} // inside a transaction: its next message comes from the client
			}
		}
	}
}

// answeringIdentity waits for the server's next message and reports whether
// it answers pgwarden's identity query: the oldest sync point outstanding is
// one. (A read error is left for the copier to meet again.)
func (t *txnSession) answeringIdentity(sc *pool.Server) bool {
	if _, err := sc.R.Peek(wire.HeaderLen); err != nil {
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.syncKinds) > 0 && t.syncKinds[0] == 'I'
}

// inspect looks at the next server message before it is copied: replies to
// pgwarden's own messages are skipped, an ErrorResponse drops what the
// server will now skip, ParameterStatus is recorded.
func (t *txnSession) inspect(sc *pool.Server, w *bufio.Writer) (skip, done bool, err error) {
	hdr, err := sc.R.Peek(wire.HeaderLen)
	if err != nil {
		return false, false, err
	}
	typ := hdr[0]
	switch typ {
	case '1', '3':
		t.mu.Lock()
		defer t.mu.Unlock()
		q := &t.parseQ
		if typ == '3' {
			q = &t.closeQ
		}
		if len(*q) == 0 {
			return false, false, nil
		}
		p := (*q)[0]
		*q = (*q)[1:]
		return p.skip, false, nil
	case 'G':
		// COPY FROM STDIN: a Sync sent with the Execute that started it
		// is ignored by PostgreSQL, and so are Syncs until CopyDone.
		t.mu.Lock()
		t.copyIn = true
		kept := t.syncKinds[:0]
		for _, k := range t.syncKinds {
			if k == 's' {
				t.syncsSent-- // sent before CopyDone: ignored, no ReadyForQuery for it
			} else {
				kept = append(kept, k)
			}
		}
		t.syncKinds = kept
		t.mu.Unlock()
	case 'E', 'S':
		if typ == 'E' {
			if done, err := refusedParse(sc.R, w); err != nil || done {
				if done {
					t.errorReply(sc, []byte{})
					if sc.R.Buffered() == 0 {
						err = w.Flush()
					}
				}
				return false, done, err
			}
		}
		n := int(binary.BigEndian.Uint32(hdr[1:])) - 4
		if n < 0 {
			return false, false, nil // the copier refuses it
		}
		if n+wire.HeaderLen > sc.R.Size() {
			if typ == 'E' {
				t.errorReply(sc, nil) // its code unread: the server is reset before reuse
			}
			return false, false, nil
		}
		msg, err := sc.R.Peek(n + wire.HeaderLen)
		if err != nil {
			return false, false, err
		}
		if typ == 'S' {
			t.noteParam(sc, msg[wire.HeaderLen:])
			return false, false, nil
		}
		t.errorReply(sc, msg[wire.HeaderLen:])
	}
	return false, false, nil
}

// errorReply handles an ErrorResponse: the server skips everything up to
// the next Sync, so what was queued in this epoch gets no reply.
func (t *txnSession) errorReply(sc *pool.Server, body []byte) {
	code := errorCode(body)
	t.mu.Lock()
	defer t.mu.Unlock()
	if body == nil || code == "26000" || code == "0A000" || code == "42P05" {
		// A statement pgwarden thought prepared is not, or its plan is
		// stale after DDL: start that server's statements afresh.
		t.srvDirty = true
	}
	epoch := t.readyRecv
	t.errEpoch = epoch
	t.copyIn = false
	for _, q := range []*[]pendingReply{&t.closeQ, &t.parseQ} { // a re-Parse's Close before its Parse
		keep := (*q)[:0]
		for _, p := range *q {
			if p.epoch <= epoch {
				t.droppedLocked(p)
			} else {
				keep = append(keep, p)
			}
		}
		*q = keep
	}
}

// errorCode is the SQLSTATE field of an ErrorResponse body.
func errorCode(body []byte) string {
	for len(body) > 1 {
		f := body[0]
		v, rest, ok := cstring(body[1:])
		if !ok {
			return ""
		}
		if f == 'C' {
			return string(v)
		}
		body = rest
	}
	return ""
}

// noteParam records a ParameterStatus: the server has that value now, and
// a setting the client changed (SET application_name…) follows it to the
// next server.
func (t *txnSession) noteParam(sc *pool.Server, body []byte) {
	name, rest, ok := cstring(body)
	if !ok {
		return
	}
	value, _, ok := cstring(rest)
	if !ok {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	sc.SetParam(string(name), string(value))
	lower := strings.ToLower(string(name))
	switch lower {
	case "application_name", "client_encoding", "datestyle", "intervalstyle", "timezone":
		if t.settings[lower] != string(value) {
			t.settings[lower] = string(value)
		}
		if sc.Applied == nil {
			sc.Applied = map[string]string{}
		}
		sc.Applied[lower] = string(value)
	}
}

// serverReadFailed handles a failed read from the attached server: a
// deadline (the client side stopped, the lease or token grace cut the
// session) or the server gone. It returns done when the loop must end.
func (t *txnSession) serverReadFailed(sc *pool.Server, fc *wire.FrameCopier, err error, lastError bool) (srvEnd, bool) {
	if wire.IsTimeout(err) {
		_ = sc.Conn.SetReadDeadline(time.Time{})
		t.mu.Lock()
		stopping, inFlight := t.stopping, t.syncsSent > t.readyRecv
		t.mu.Unlock()
		switch {
		case t.failure.Load() != nil:
			return srvEnd{notify: *t.failure.Load(), boundary: fc.AtBoundary()}, true
		case stopping || t.killed.Load():
			return srvEnd{clientStopped: true}, true
		case t.cut.Load() && !inFlight && fc.AtBoundary():
			if t.tokenExpired.Load() {
				return srvEnd{why: "token expired", notify: errTokenExpiredCut, boundary: true}, true
			}
			return srvEnd{why: "credential lease ended", notify: errLeaseEnded, boundary: true}, true
		}
		return srvEnd{}, false // resume, in the middle of a message if need be
	}
	t.mu.Lock()
	stopping := t.stopping
	t.mu.Unlock()
	if stopping {
		return srvEnd{clientStopped: true}, true
	}
	e := srvEnd{why: "upstream closed", boundary: fc.AtBoundary()}
	if errors.Is(err, wire.ErrFraming) {
		e.why = "upstream protocol violation"
	}
	if !lastError {
		e.notify = errUpstreamLost
	}
	return e, true
}

// ParkedClients is how many idle clients are parked now (no goroutine
// each); 0 where parking is not available.
func (s *Server) ParkedClients() int {
	if s.parker == nil {
		return 0
	}
	return s.parker.Waiting()
}
