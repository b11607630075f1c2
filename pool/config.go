package pool

import (
	"errors"
	"fmt"
	"time"
)

// Config bounds upstream connections. The zero value of each field means its
// default; RELOAD replaces a running Set's whole Config (Set.SetLimits).
type Config struct {
	// MaxPerPool bounds open connections of one (database, level). Default 50.
	MaxPerPool int
	// MaxTotal bounds all open upstream connections. Default 200.
	MaxTotal int
	// AcquireTimeout is how long a client waits for a connection slot. Default 10s.
	AcquireTimeout time.Duration
	// IdleTimeout closes connections idle that long. Default 5m.
	IdleTimeout time.Duration
	// DialTimeout bounds opening one upstream connection. Default 10s.
	DialTimeout time.Duration
	// PingAfterIdle: an idle connection unused for this long answers a
	// round trip (within PingTimeout) before it is lent; a quicker check that
	// the server has not closed it runs every time. Default 1s.
	PingAfterIdle time.Duration
	// PingTimeout bounds that round trip. Default 2s.
	PingTimeout time.Duration
	// MaxPreparedStatements bounds the named statements kept prepared on
	// each session in transaction mode; the least recently used is closed
	// beyond it. Default 200.
	MaxPreparedStatements int
}

// errLimits is a Config whose connection limits are not positive.
var errLimits = errors.New("connection limits must be positive")

// CheckAndSetDefaults fills in the defaults of fields left zero and checks
// that the limits are positive and no duration negative.
func (c *Config) CheckAndSetDefaults() error {
	if c.MaxPerPool == 0 {
		c.MaxPerPool = 50
	}
	if c.MaxTotal == 0 {
		c.MaxTotal = 200
	}
	if c.AcquireTimeout == 0 {
		c.AcquireTimeout = 10 * time.Second
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = 5 * time.Minute
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = 10 * time.Second
	}
	if c.PingAfterIdle == 0 {
		c.PingAfterIdle = time.Second
	}
	if c.PingTimeout == 0 {
		c.PingTimeout = 2 * time.Second
	}
	if c.MaxPreparedStatements == 0 {
		c.MaxPreparedStatements = 200
	}
	if c.MaxPerPool < 1 || c.MaxTotal < 1 || c.MaxPreparedStatements < 1 {
		return errLimits
	}
	for _, d := range []time.Duration{c.AcquireTimeout, c.IdleTimeout, c.DialTimeout, c.PingAfterIdle, c.PingTimeout} {
		if d < 0 {
			return fmt.Errorf("negative duration %v", d)
		}
	}
	return nil
}
