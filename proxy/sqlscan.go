package proxy

import (
	"bytes"
	"strings"
)

// What a client's SQL text does that pgwarden must act on. The scan is
// lexical: it finds each statement's leading keywords and a few function
// names, skipping comments, string literals, quoted identifiers and
// dollar-quoted bodies (which it scans as SQL of their own, since DO blocks
// and function bodies live there). It is a guard for the direct forms, not
// a parser: SQL that builds a setting's name at run time is not caught (see
// the README's "Transaction pooling" section).
type sqlFlags uint16

const (
	// sqlSession changes session state that outlives the transaction: SET
	// (not LOCAL), RESET, PREPARE, DEALLOCATE, DISCARD, LOAD, LISTEN, a
	// temporary table, a WITH HOLD cursor, a session advisory lock,
	// set_config, DO.
	sqlSession sqlFlags = 1 << iota
	// sqlListen is LISTEN, which cannot work when the server changes.
	sqlListen
	// sqlForge sets or resets one of pgwarden's identity settings.
	sqlForge
	// sqlDiscardAll is DISCARD ALL: every prepared statement goes.
	sqlDiscardAll
	// sqlDeallocate is DEALLOCATE (a statement, or ALL).
	sqlDeallocate
	// sqlResetAll is RESET ALL or DISCARD ALL: the identity settings go
	// too, and pgwarden sets them again.
	sqlResetAll
	// sqlTracked is a SET of a parameter PostgreSQL reports back
	// (application_name, TimeZone…), which pgwarden follows per client.
	sqlTracked
)

// identityPrefix starts every setting pgwarden sets for row-level security.
const identityPrefix = "pgwarden."

// scanSQL classifies sql. For a lone DEALLOCATE it also returns the
// statement's name as PostgreSQL folds it ("" for ALL). It allocates nothing
// unless it returns a name.
func scanSQL(sql []byte) (flags sqlFlags, deallocate string) {
	s := sqlScanner{rest: sql}
	s.run(0)
	if s.stmts != 1 {
		s.flags &^= sqlDeallocate
		s.dealloc = nil
	}
	if s.flags&sqlDeallocate != 0 && s.dealloc != nil {
		if s.deallocQuoted {
			deallocate = string(s.dealloc)
		} else {
			deallocate = strings.ToLower(string(s.dealloc))
		}
	}
	return s.flags, deallocate
}

type sqlScanner struct {
	dynamic       bool   // a body (DO, function) runs dynamic SQL (EXECUTE)
	rest          []byte // what is left to scan
	flags         sqlFlags
	stmts         int
	dealloc       []byte
	deallocQuoted bool
}

// token kinds
const (
	tokWord    = iota + 1
	tokString  // a plain literal: '…' or $tag$…$tag$
	tokEString // an escape string literal, E'…', whose escapes are not undone
	tokQuotedIdent
	tokPunct
)

// sqlToken aliases the scanned text: a word, a literal's content (escapes
// not undone) or one punctuation byte.
type sqlToken struct {
	kind int
	text []byte
}

func (t sqlToken) is(word string) bool {
	return t.kind == tokWord && asciiEqualFold(t.text, word)
}

func (t sqlToken) punct(c byte) bool { return t.kind == tokPunct && t.text[0] == c }

// asciiEqualFold compares b with a lower-case ASCII word.
func asciiEqualFold(b []byte, lower string) bool {
	if len(b) != len(lower) {
		return false
	}
	for i := range b {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != lower[i] {
			return false
		}
	}
	return true
}

// run scans statements; depth bounds recursion into dollar-quoted bodies.
func (s *sqlScanner) run(depth int) {
	var buf [6]sqlToken // a statement's leading tokens
	stmt := buf[:0]
	var prev sqlToken
	var first sqlToken // the statement's first token
	setConfig := 0     // where a set_config call's arguments are: 1 name seen, 2 "(" seen, 3 a plain literal seen
	// UPDATE pg_settings sets any setting, wherever the UPDATE sits
	// (EXPLAIN ANALYZE, PREPARE … AS, a CTE).
	var sawUpdate, sawSettings bool
	endStmt := func() {
		if len(stmt) > 0 {
			s.stmts++
			s.classify(stmt)
		}
		if sawUpdate && sawSettings {
			s.flags |= sqlForge
		}
		stmt = buf[:0]
		prev, first, setConfig, sawUpdate, sawSettings = sqlToken{}, sqlToken{}, 0, false, false
	}
	for {
		tok, body, ok := s.next()
		if !ok {
			break
		}
		if body != nil && depth < 4 {
			inner := sqlScanner{rest: body}
			inner.run(depth + 1)
			s.flags |= inner.flags &^ (sqlDiscardAll | sqlDeallocate | sqlTracked)
			if first.is("do") && inner.dynamic {
				// A DO block running dynamic SQL could set pgwarden.*
				// under a name it builds at run time.
				s.flags |= sqlForge
			}
			s.dynamic = s.dynamic || inner.dynamic
		}
		if tok.punct(';') {
			endStmt()
			continue
		}
		if len(stmt) == 0 {
			first = tok
		}
		if len(stmt) < cap(stmt) {
			stmt = append(stmt, tok)
		}
		// set_config must name its setting with a plain literal, and not
		// one of pgwarden's: a parameter, an expression, an escape string
		// or named arguments could name anything.
		switch setConfig {
		case 1:
			setConfig = 0
			if tok.punct('(') {
				setConfig = 2
			}
		case 2:
			setConfig = 0
			if tok.kind != tokString || hasIdentityPrefix(tok.text) || asciiEqualFold(tok.text, "standard_conforming_strings") {
				s.flags |= sqlForge
			} else {
				setConfig = 3
			}
		case 3:
			setConfig = 0
			if !tok.punct(',') {
				s.flags |= sqlForge // 'pgwar' || 'den.subject'
			}
		}
		switch {
		case tok.is("set_config") || (tok.kind == tokQuotedIdent && string(tok.text) == "set_config"):
			setConfig = 1
		case tok.is("execute") && depth > 0:
			s.dynamic = true
		case tok.is("update"):
			sawUpdate = true
		case tok.is("temp") || tok.is("temporary") || tok.is("pg_temp"):
			s.flags |= sqlSession // a temporary object outlives the transaction
		case tok.is("hold") && prev.is("with") && first.is("declare"):
			s.flags |= sqlSession // a WITH HOLD cursor
		case tok.is("pg_settings"):
			sawSettings = true
		case (prev.is("set") || prev.is("reset") || prev.is("local") || prev.is("session")) && s.identityName(tok):
			s.flags |= sqlForge // SET [LOCAL|SESSION] pgwarden.…, RESET, ALTER … SET
		case (prev.is("set") || prev.is("reset") || prev.is("local") || prev.is("session")) && tok.is("u"):
			s.flags |= sqlForge // SET U&"…": a name spelled with escapes
		}
		if tok.punct('(') && prev.kind == tokWord && isSessionFunc(prev.text) {
			s.flags |= sqlSession // a function whose effect outlives the transaction
		}
		prev = tok
	}
	endStmt()
}

func isSessionFunc(name []byte) bool {
	for _, f := range [...]string{"set_config", "pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared"} {
		if asciiEqualFold(name, f) {
			return true
		}
	}
	return false
}

// identityName reports whether tok starts a pgwarden.* setting name: the
// word pgwarden followed by a dot, or a quoted identifier "pgwarden.…" or
// "pgwarden".
func (s *sqlScanner) identityName(tok sqlToken) bool {
	switch tok.kind {
	case tokQuotedIdent:
		return hasIdentityPrefix(tok.text) || asciiEqualFold(tok.text, "pgwarden")
	case tokWord:
		if !asciiEqualFold(tok.text, "pgwarden") {
			return false
		}
		look := *s // the next token, comments skipped
		next, _, ok := look.next()
		return ok && next.punct('.')
	}
	return false
}

func hasIdentityPrefix(b []byte) bool {
	return len(b) >= len(identityPrefix) && asciiEqualFold(b[:len(identityPrefix)], identityPrefix)
}

// classify looks at a statement's leading tokens.
func (s *sqlScanner) classify(t []sqlToken) {
	at := func(i int) sqlToken {
		if i < len(t) {
			return t[i]
		}
		return sqlToken{}
	}
	tracked := func(tok sqlToken) bool {
		for _, p := range [...]string{"application_name", "client_encoding", "datestyle", "intervalstyle", "timezone"} {
			if tok.is(p) {
				return true
			}
		}
		return false
	}
	first := at(0)
	switch {
	case first.is("set"):
		w := 1
		switch {
		case at(1).is("local"), at(1).is("transaction"), at(1).is("constraints"):
			return // ends with the transaction
		case at(1).is("session"):
			if at(2).is("characteristics") || at(2).is("authorization") {
				s.flags |= sqlSession
				return
			}
			w = 2
		}
		if at(w).is("standard_conforming_strings") {
			v := at(w + 2)
			if !(v.is("on") || v.is("true") || v.is("default") || v.kind == tokString && (asciiEqualFold(v.text, "on") || asciiEqualFold(v.text, "true"))) {
				// Backslashes in plain literals would start escaping: SQL
				// pgwarden reads one way, PostgreSQL another.
				s.flags |= sqlForge
			}
		}
		if tracked(at(w)) || (at(w).is("time") && at(w+1).is("zone")) {
			s.flags |= sqlTracked
			return
		}
		s.flags |= sqlSession
	case first.is("reset"), first.is("load"), first.is("do"), first.is("unlisten"):
		s.flags |= sqlSession
		if first.is("reset") && at(1).is("all") {
			s.flags |= sqlResetAll
		}
	case first.is("listen"):
		s.flags |= sqlSession | sqlListen
	case first.is("prepare"):
		if !at(1).is("transaction") {
			s.flags |= sqlSession
		}
	case first.is("deallocate"):
		s.flags |= sqlSession | sqlDeallocate
		i := 1
		if at(1).is("prepare") {
			i = 2
		}
		if n := at(i); !n.is("all") && (n.kind == tokWord || n.kind == tokQuotedIdent) {
			s.dealloc, s.deallocQuoted = n.text, n.kind == tokQuotedIdent
		}
	case first.is("discard"):
		s.flags |= sqlSession
		if at(1).is("all") {
			s.flags |= sqlDiscardAll | sqlResetAll
		}
	case first.is("declare"):
		for i := 1; i+1 < len(t); i++ {
			if at(i).is("with") && at(i+1).is("hold") {
				s.flags |= sqlSession
			}
		}
	case first.is("create"):
		for i := 1; i < 4; i++ {
			if at(i).is("temp") || at(i).is("temporary") {
				s.flags |= sqlSession
			}
		}
	}
}

// next returns the next token, and for a dollar-quoted literal its body (to
// scan as SQL). ok is false at the end.
func (s *sqlScanner) next() (tok sqlToken, body []byte, ok bool) {
	b := s.rest
	for len(b) > 0 {
		c := b[0]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f':
			b = b[1:]
		case c == '-' && len(b) > 1 && b[1] == '-':
			i := bytes.IndexByte(b, '\n')
			if i < 0 {
				b = nil
			} else {
				b = b[i+1:]
			}
		case c == '/' && len(b) > 1 && b[1] == '*':
			b = skipBlockComment(b)
		case c == '\'' || ((c == 'e' || c == 'E') && len(b) > 1 && b[1] == '\''):
			escapes := c != '\''
			if escapes {
				b = b[1:]
			}
			lit, rest := quoted(b, '\'', escapes)
			s.rest = rest
			kind := tokString
			if escapes {
				kind = tokEString
			}
			return sqlToken{kind: kind, text: lit}, nil, true
		case c == '"':
			lit, rest := quoted(b, '"', false)
			s.rest = rest
			return sqlToken{kind: tokQuotedIdent, text: lit}, nil, true
		case c == '$':
			if tag := dollarTag(b); tag != nil {
				inner := b[len(tag):]
				end := bytes.Index(inner, tag)
				if end < 0 {
					s.rest = nil
				} else {
					s.rest = inner[end+len(tag):]
					inner = inner[:end]
				}
				return sqlToken{kind: tokString, text: inner}, inner, true
			}
			b = b[1:] // a parameter such as $1
			for len(b) > 0 && b[0] >= '0' && b[0] <= '9' {
				b = b[1:]
			}
		case isIdentStart(c):
			i := 1
			for i < len(b) && isIdentChar(b[i]) {
				i++
			}
			s.rest = b[i:]
			return sqlToken{kind: tokWord, text: b[:i]}, nil, true
		default:
			s.rest = b[1:]
			return sqlToken{kind: tokPunct, text: b[:1]}, nil, true
		}
	}
	s.rest = nil
	return sqlToken{}, nil, false
}

func isIdentStart(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '_' || c >= 0x80
}

func isIdentChar(c byte) bool { return isIdentStart(c) || c >= '0' && c <= '9' || c == '$' }

// skipBlockComment skips a /* */ comment, which PostgreSQL nests.
func skipBlockComment(b []byte) []byte {
	depth := 0
	for i := 0; i+1 < len(b); i++ {
		switch {
		case b[i] == '/' && b[i+1] == '*':
			depth++
			i++
		case b[i] == '*' && b[i+1] == '/':
			depth--
			i++
			if depth == 0 {
				return b[i+1:]
			}
		}
	}
	return nil
}

// quoted reads a literal opened by b[0] == q: doubled quotes stand for one,
// and with escapes a backslash escapes the next byte. It returns the raw
// content and what follows.
func quoted(b []byte, q byte, escapes bool) (content, rest []byte) {
	for i := 1; i < len(b); i++ {
		switch {
		case escapes && b[i] == '\\':
			i++
		case b[i] == q:
			if i+1 < len(b) && b[i+1] == q {
				i++
				continue
			}
			return b[1:i], b[i+1:]
		}
	}
	return b[1:], nil
}

// dollarTag returns the $tag$ opening b, or nil when b's $ starts something
// else (a parameter).
func dollarTag(b []byte) []byte {
	for i := 1; i < len(b); i++ {
		c := b[i]
		switch {
		case c == '$':
			return b[:i+1]
		case c >= '0' && c <= '9':
			if i == 1 {
				return nil
			}
		case !isIdentStart(c):
			return nil
		}
	}
	return nil
}
