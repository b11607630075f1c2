//go:build !linux

package wire

import (
	"errors"
	"syscall"
)

// Parker is Linux-only (it uses epoll); elsewhere NewParker fails and
// callers keep a goroutine per connection.
type Parker struct{}

// Parked is one parked connection.
type Parked struct{}

// ErrNotParkable is returned by Park for a connection it cannot watch.
var ErrNotParkable = errors.New("wire: connection cannot be parked")

// NewParker fails: parking needs epoll.
func NewParker() (*Parker, error) { return nil, ErrNotParkable }

// Park always fails here.
func (p *Parker) Park(syscall.Conn, func()) (*Parked, error) { return nil, ErrNotParkable }

// Wake does nothing here.
func (pk *Parked) Wake() bool { return false }

// Waiting is always 0 here.
func (p *Parker) Waiting() int { return 0 }

// Close does nothing here.
func (p *Parker) Close() error { return nil }
