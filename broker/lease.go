package broker

import (
	"context"
	"sync"
	"time"
)

// lease is the life of one Credential. The Broker owns it: only the broker
// renews it, retires it, ends it and revokes it. The sessions using the
// credential learn of its retirement and end through OnRetire and OnEnd (no
// session keeps a timer of its own for a lease); the pool says who uses it
// through Hold and Release, so the broker knows when nothing does.
//
//   - superseded: new sessions must not use it, open ones carry on. A
//     credential PostgreSQL refused (Forget: its password was changed by a
//     session of it, or it was revoked) and a static role's credential
//     after Vault rotated the password are superseded.
//   - retired: superseded, and open sessions end at their next idle point.
//     It retires a margin before its end, when renewal can extend it no
//     further (make-before-break: the next request reads a new one), when
//     Vault says it is gone, or when the token that read it expires.
//   - ended: open sessions are cut; Vault drops (or has dropped) the role.
//   - finished: superseded (or retired, or ended) and held by nobody; the
//     broker revokes it then (finish runs once), and its timers and
//     callbacks are let go.
type lease struct {
	retireCtx context.Context
	retire    context.CancelFunc
	endCtx    context.Context
	end       context.CancelFunc

	mu       sync.Mutex
	retireAt time.Time // guarded by mu: the earlier of Vault's and the client's bound
	endAt    time.Time // guarded by mu
	// Vault's bound (the lease, the token that read it) and the client's
	// (identity scope: the latest token exp of the person it serves, zero
	// for none), guarded by mu. retireAt and endAt follow from them.
	vaultRetire, vaultEnd time.Time
	authUntil             time.Time
	grace                 time.Duration // how long past authUntil it ends
	holders               int           // guarded by mu
	retireT               *time.Timer   // guarded by mu
	endT                  *time.Timer   // guarded by mu
	superseded            bool          // guarded by mu
	done                  bool          // guarded by mu: finish has been called
	cleanups              []func() bool // guarded by mu: run at finish (AfterFunc stops)
	// finish is called once, without mu, when the lease is retired and
	// nobody holds it. The broker revokes it there.
	finish func()
}

// newLease starts a lease that Vault bounds by vaultRetire and vaultEnd
// and, when authUntil is not zero, the client by authUntil (retire) and
// authUntil+grace (end).
func newLease(now, vaultRetire, vaultEnd, authUntil time.Time, grace time.Duration, finish func()) *lease {
	l := &lease{finish: finish, vaultRetire: vaultRetire, vaultEnd: vaultEnd, authUntil: authUntil, grace: grace}
	l.retireCtx, l.retire = context.WithCancel(context.Background())
	l.endCtx, l.end = context.WithCancel(context.Background())
	l.mu.Lock()
	l.applyLocked(now)
	l.mu.Unlock()
	return l
}

// applyLocked schedules the lease by its bounds.
func (l *lease) applyLocked(now time.Time) {
	retireAt, endAt := l.vaultRetire, l.vaultEnd
	if !l.authUntil.IsZero() {
		retireAt = minTime(retireAt, l.authUntil)
		endAt = minTime(endAt, l.authUntil.Add(l.grace))
	}
	l.scheduleLocked(now, retireAt, endAt)
}

// scheduleLocked (re)arms the timers for retireAt and endAt. Times only
// move as renewal allows; a retirement or end that has happened stays.
func (l *lease) scheduleLocked(now, retireAt, endAt time.Time) {
	if retireAt.After(endAt) {
		retireAt = endAt
	}
	l.retireAt, l.endAt = retireAt, endAt
	if l.retireT != nil {
		l.retireT.Stop()
	}
	if l.endT != nil {
		l.endT.Stop()
	}
	l.retireT = time.AfterFunc(retireAt.Sub(now), l.doRetire)
	l.endT = time.AfterFunc(endAt.Sub(now), l.doEnd)
}

// renewed moves Vault's bound after a renewal.
func (l *lease) renewed(now, vaultRetire, vaultEnd time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.retireCtx.Err() != nil {
		return // retired leases are on their way out; renewal cannot call them back
	}
	l.vaultRetire, l.vaultEnd = vaultRetire, vaultEnd
	l.applyLocked(now)
}

// capEnd moves the lease's end to end, if that is sooner (and its
// retirement with it).
func (l *lease) capEnd(now, end time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.done || !end.Before(l.vaultEnd) {
		return
	}
	l.vaultRetire, l.vaultEnd = minTime(l.vaultRetire, end), end
	l.applyLocked(now)
}

// doRetire retires the lease now.
func (l *lease) doRetire() {
	l.retire()
	l.maybeFinish()
}

// supersede stops the lease being handed out, leaving its sessions be.
func (l *lease) supersede() {
	l.mu.Lock()
	l.superseded = true
	l.mu.Unlock()
	l.maybeFinish()
}

// stale reports whether new sessions must not use the lease.
func (l *lease) stale() bool {
	if l.retireCtx.Err() != nil {
		return true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.superseded
}

// onFinish registers stop to be called when the lease finishes (or at
// once, if it has).
func (l *lease) onFinish(stop func() bool) {
	l.mu.Lock()
	if !l.done {
		l.cleanups = append(l.cleanups, stop)
		l.mu.Unlock()
		return
	}
	l.mu.Unlock()
	stop()
}

// doEnd ends (and so retires) the lease now.
func (l *lease) doEnd() {
	l.retire()
	l.end()
	l.maybeFinish()
}

func (l *lease) hold() {
	l.mu.Lock()
	l.holders++
	l.mu.Unlock()
}

func (l *lease) release() {
	l.mu.Lock()
	l.holders--
	l.mu.Unlock()
	l.maybeFinish()
}

// maybeFinish calls finish once the lease is superseded (or retired) and
// unheld, and lets go of its timers and callbacks: nothing uses it any
// more, and a lease that never ends (a static role's) must not keep them.
func (l *lease) maybeFinish() {
	l.mu.Lock()
	if l.done || l.holders > 0 || (l.retireCtx.Err() == nil && !l.superseded) {
		l.mu.Unlock()
		return
	}
	l.done = true
	l.retireT.Stop()
	l.endT.Stop()
	cleanups := l.cleanups
	l.cleanups = nil
	l.mu.Unlock()
	for _, stop := range cleanups {
		stop()
	}
	if l.finish != nil {
		l.finish()
	}
}

// finished reports whether the lease has finished.
func (l *lease) finished() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.done
}

func (l *lease) stopTimers() {
	l.mu.Lock()
	l.retireT.Stop()
	l.endT.Stop()
	l.mu.Unlock()
}

// vaultEndAt is Vault's bound on the lease as things stand (renewal may
// move it): when Vault ends it unless it is revoked first.
func (l *lease) vaultEndAt() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.vaultEnd
}

// Retired reports whether the credential's sessions must end at their next
// idle point.
func (c *Credential) Retired() bool { return c.lease.retireCtx.Err() != nil }

// Stale reports whether the credential must no longer be used for new
// sessions (it is superseded or retired); its open sessions may carry on
// unless it is retired.
func (c *Credential) Stale() bool { return c.lease.stale() }

// Finished reports whether the credential is stale and nothing holds it:
// it will not be used again.
func (c *Credential) Finished() bool { return c.lease.finished() }

// Ended reports whether the credential's lease has ended.
func (c *Credential) Ended() bool { return c.lease.endCtx.Err() != nil }

// OnRetire calls f (in its own goroutine) when the credential retires, or
// at once if it has. stop cancels the call; it reports whether it did.
func (c *Credential) OnRetire(f func()) (stop func() bool) {
	return context.AfterFunc(c.lease.retireCtx, f)
}

// OnEnd calls f (in its own goroutine) when the credential's lease ends, or
// at once if it has. stop cancels the call.
func (c *Credential) OnEnd(f func()) (stop func() bool) {
	return context.AfterFunc(c.lease.endCtx, f)
}

// ExpiresAt is when the lease ends as things stand: renewal may move it.
func (c *Credential) ExpiresAt() time.Time {
	c.lease.mu.Lock()
	defer c.lease.mu.Unlock()
	return c.lease.endAt
}

// RetireAt is when the credential retires as things stand.
func (c *Credential) RetireAt() time.Time {
	c.lease.mu.Lock()
	defer c.lease.mu.Unlock()
	return c.lease.retireAt
}

// Hold says one more upstream connection uses the credential. Every Hold is
// matched by one Release, when that connection is closed.
func (c *Credential) Hold() { c.lease.hold() }

// Release says an upstream connection that used the credential is closed.
// When the credential has retired and nothing holds it any more, the broker
// revokes its lease.
func (c *Credential) Release() { c.lease.release() }

// Fixed returns a credential whose life is set in advance: it retires at
// retireAt and ends at endAt, and nothing renews or revokes it. It is for
// credentials that do not come from Vault's leases (tests at the proxy's
// boundary).
func Fixed(username, password, leaseID string, retireAt, endAt time.Time) *Credential {
	return &Credential{Username: username, Password: password, LeaseID: leaseID,
		lease: newLease(time.Now(), retireAt, endAt, time.Time{}, 0, nil)}
}

// LeaseInfo is a lease as the admin console shows it: who and what, never
// the password.
type LeaseInfo struct {
	Database, VaultRole, Username, LeaseID, Scope, Subject string
	// State is active, superseded, retired or ended.
	State               string
	ExpiresAt, RetireAt time.Time
	// Holders counts the upstream sessions open under it.
	Holders int
	Static  bool
}

// info describes c.
func (c *Credential) info() LeaseInfo {
	l := c.lease
	l.mu.Lock()
	defer l.mu.Unlock()
	state := "active"
	switch {
	case l.endCtx.Err() != nil:
		state = "ended"
	case l.retireCtx.Err() != nil:
		state = "retired"
	case l.superseded:
		state = "superseded"
	}
	return LeaseInfo{Database: c.key.database, VaultRole: c.VaultRole, Username: c.Username, LeaseID: c.LeaseID,
		Scope: c.Scope, Subject: c.Subject, State: state, ExpiresAt: l.endAt, RetireAt: l.retireAt, Holders: l.holders, Static: c.Static}
}
