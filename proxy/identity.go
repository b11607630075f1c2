package proxy

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"strings"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/authn"
	"github.com/pgwarden/pgwarden/pgerror"
	"github.com/pgwarden/pgwarden/pool"
	"github.com/pgwarden/pgwarden/wire"
)

// Identity in the session, for row-level security.
//
// On every server a client uses, pgwarden sets pgwarden.subject,
// pgwarden.groups (a PostgreSQL text array literal), pgwarden.issuer and
// pgwarden.level, so a policy such as
//
//	USING (owner = current_setting('pgwarden.subject'))
//
// holds even when many people share one database user. They are set with
// set_config(..., false) when the client is given a server — at its login
// and at its first message in session mode (DISCARD ALL clears them when the
// session ends), at every attach in transaction mode (each attach sets the
// values of the client attaching, unless the server already has them) —
// and a client may not
// change them: a startup option naming them, and SQL that sets or resets
// them (SET, SET LOCAL, RESET, set_config, ALTER ... SET, also inside DO and
// function bodies), are refused with 42501 (see scanSQL).

// identitySettings are the settings for id at level, in a fixed order.
func identitySettings(id *authn.Identity, level string) [][2]string {
	return [][2]string{
		{"pgwarden.subject", id.Subject},
		{"pgwarden.groups", textArray(id.Groups)},
		{"pgwarden.issuer", id.Issuer},
		{"pgwarden.level", level},
	}
}

// identityQuery is a Query setting the client's identity settings.
func (c *clientConn) identityQuery() []byte {
	var b strings.Builder
	writeSetConfig(&b, identitySettings(c.id, c.level))
	q, _ := (&pgproto3.Query{String: b.String()}).Encode(nil)
	return q
}

// identityKey identifies identitySettings' values, to tell whether a server
// has them already.
func identityKey(id *authn.Identity, level string) string {
	return id.Subject + "\x00" + textArray(id.Groups) + "\x00" + id.Issuer + "\x00" + level
}

// textArray writes ss as a PostgreSQL text array literal, every element
// quoted: {"a","b \"c\""}.
func textArray(ss []string) string {
	var b strings.Builder
	b.WriteByte('{')
	for i, s := range ss {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('"')
		for _, r := range s {
			if r == '"' || r == '\\' {
				b.WriteByte('\\')
			}
			b.WriteRune(r)
		}
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String()
}

// errForged refuses SQL that sets one of pgwarden's identity settings.
var errForged = pgerror.New(pgerror.InsufficientPrivilege,
	"pgwarden refused this statement: pgwarden.* settings are set from your token, and this statement could change them").
	WithHint("Read them with current_setting('pgwarden.subject'). pgwarden refuses SET/RESET of pgwarden.*, set_config naming its setting other than by a plain string literal, " +
		"UPDATE pg_settings, standard_conforming_strings = off and DO blocks that run dynamic SQL.")

// errListen refuses LISTEN in transaction mode.
var errListen = pgerror.New(pgerror.FeatureNotSupported,
	"LISTEN is not supported in transaction pooling mode: notifications would be lost when the server changes").
	WithHint("Use a level in session pool mode for LISTEN, or listen through a direct connection.")

// refusalSQL is SQL that makes PostgreSQL raise err itself. A refused
// statement is replaced by it, so the error reaches the client in its place
// among the replies, and aborts an open transaction as the client expects.
func refusalSQL(err *pgerror.Error) string {
	return "DO $pgwarden$BEGIN RAISE EXCEPTION USING ERRCODE = " + pool.QuoteLiteral(err.Code) +
		", MESSAGE = " + pool.QuoteLiteral(err.Message) + ", HINT = " + pool.QuoteLiteral(err.Hint) + "; END$pgwarden$"
}

// screenSQL looks at a whole Query or Parse message from a client and
// returns the message to send instead when its SQL forges an identity
// setting (or, with listen, is a LISTEN, which transaction mode refuses):
// the same message with the SQL replaced by refusalSQL, so a Parse keeps its
// name and parameter types. It also returns the scan's flags.
func screenSQL(msg []byte, listen bool) (replacement []byte, flags sqlFlags, dealloc string, err error) {
	body := msg[wire.HeaderLen:]
	var sql []byte
	if msg[0] == 'P' {
		_, rest, ok := cstring(body)
		if !ok {
			return nil, 0, "", errMalformed
		}
		if sql, _, ok = cstring(rest); !ok {
			return nil, 0, "", errMalformed
		}
	} else {
		sql = bytes.TrimSuffix(body, []byte{0})
	}
	flags, dealloc = scanSQL(sql)
	var refusal *pgerror.Error
	switch {
	case flags&sqlForge != 0:
		refusal = errForged
	case listen && flags&sqlListen != 0:
		refusal = errListen
	default:
		return nil, flags, dealloc, nil
	}
	if msg[0] == 'Q' {
		replacement, _ = (&pgproto3.Query{String: refusalSQL(refusal)}).Encode(nil)
		return replacement, flags, dealloc, nil
	}
	// A Parse is answered at once, before anything runs: it is replaced by
	// one PostgreSQL fails with a syntax error naming a marker, which the
	// server side turns into the refusal (refusedParse), in its place among
	// the replies. The server then skips to Sync, as for any failed Parse.
	var p pgproto3.Parse
	if err := p.Decode(body); err != nil {
		return nil, 0, "", errMalformed
	}
	p.Query = refusalMarkers[refusal]
	replacement, _ = p.Encode(nil)
	return replacement, flags, dealloc, nil
}

// setConfigOID is pg_catalog.set_config's OID, fixed in PostgreSQL's
// catalog: a FunctionCall of it could set any setting.
const setConfigOID = 2078

// forgedCall reports whether msg, a whole FunctionCall, calls set_config.
func forgedCall(msg []byte) bool {
	return len(msg) >= wire.HeaderLen+4 && binary.BigEndian.Uint32(msg[wire.HeaderLen:]) == setConfigOID
}

// refusalMarkers are the SQL a refused Parse is replaced with; PostgreSQL's
// answer is `syntax error at or near "<marker>"`.
var refusalMarkers = map[*pgerror.Error]string{errForged: "pgwarden_refused_identity", errListen: "pgwarden_refused_listen",
	errTooManyStatements: "pgwarden_refused_statements"}

// maxClientStatements bounds one client's named statements in transaction
// mode: each costs pgwarden memory (its Parse is kept to prepare it on other
// servers). Drivers' caches hold far fewer (pgx 512, pgjdbc 256).
const maxClientStatements = 10000

// errTooManyStatements refuses a client's Parse past maxClientStatements.
var errTooManyStatements = pgerror.Newf(pgerror.ProgramLimitExceeded,
	"too many prepared statements: pgwarden keeps at most %d per client in transaction pooling mode", maxClientStatements).
	WithHint("Close or DEALLOCATE the statements you no longer use; a driver's statement cache of a few hundred stays well under it.")

// refusedParse turns PostgreSQL's answer to a refused Parse into the
// refusal: at a message boundary of r, when the next message is such an
// ErrorResponse, it writes the refusal to w instead and reports true.
func refusedParse(r *bufio.Reader, w *bufio.Writer) (bool, error) {
	hdr, err := r.Peek(wire.HeaderLen)
	if err != nil || hdr[0] != 'E' {
		return false, err
	}
	size := int(binary.BigEndian.Uint32(hdr[1:])) + 1
	if size < wire.HeaderLen || size > r.Size() || size > 1024 {
		return false, nil
	}
	msg, err := r.Peek(size)
	if err != nil {
		return false, err
	}
	var er pgproto3.ErrorResponse
	if er.Decode(msg[wire.HeaderLen:]) != nil || er.Code != pgerror.SyntaxError {
		return false, nil
	}
	for refusal, marker := range refusalMarkers {
		// The message is in the server's lc_messages; the marker is not.
		if er.Position == 1 && strings.Contains(er.Message, marker) {
			out, _ := errorResponse("ERROR", refusal).Encode(nil)
			if _, err := w.Write(out); err != nil {
				return false, err
			}
			_, _ = r.Discard(size)
			return true, nil
		}
	}
	return false, nil
}
