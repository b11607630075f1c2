package console

import (
	"errors"
	"strconv"
	"strings"

	"github.com/pgwarden/pgwarden/pgerror"
)

// SQLSTATE codes the console sends that pgerror does not name.
const (
	syntaxError     = "42601" // syntax_error
	undefinedObject = "42704" // undefined_object
)

// usage lists the commands; it is the hint of a syntax error and the detail
// of SHOW HELP.
const usage = "SHOW POOLS|CLIENTS|SERVERS|STATS|DATABASES|CONFIG|LEASES|HELP; " +
	"RELOAD; PAUSE [db]; RESUME [db]; KILL <client id>; KILL SUBJECT '<subject>'"

// op is what a command does.
type op int

const (
	opShow op = iota + 1
	opReload
	opPause
	opResume
	opKill
	opKillSubject
)

// views are the names SHOW takes, lower case.
var views = []string{"pools", "clients", "servers", "stats", "databases", "config", "leases", "help"}

// command is one parsed console statement.
type command struct {
	op       op
	view     string // SHOW: one of views
	database string // PAUSE, RESUME: "" means every database
	client   uint64 // KILL
	subject  string // KILL SUBJECT
}

// errEmpty is parse's answer to a query with no statement in it, which
// PostgreSQL answers with EmptyQueryResponse.
var errEmpty = errors.New("empty query")

// parse reads one console statement. Keywords are case-insensitive; a
// database name is a bare word (kept as written) or a double-quoted
// identifier; a subject is a standard SQL string literal. Whitespace,
// -- and /* */ comments and trailing semicolons are ignored. A query holding
// more than one statement is refused as a whole, so that no part of it runs.
// Errors are *pgerror.Error, or errEmpty.
func parse(q string) (command, error) {
	l := &lexer{s: q}
	l.skipSemis()
	if l.err == nil && l.eof() {
		return command{}, errEmpty
	}
	c, err := l.statement()
	if err == nil {
		err = l.end()
	}
	if l.err != nil {
		err = l.err
	}
	return c, err
}

func (l *lexer) statement() (command, error) {
	w := l.word()
	switch verb := strings.ToUpper(w); verb {
	case "SHOW":
		return l.show()
	case "RELOAD":
		return command{op: opReload}, nil
	case "PAUSE", "RESUME":
		db, err := l.optIdent()
		c := command{op: opPause, database: db}
		if verb == "RESUME" {
			c.op = opResume
		}
		return c, err
	case "KILL":
		return l.kill()
	case "KILL_CLIENT": // PgBouncer's spelling
		return l.killClient()
	case "":
		return command{}, l.syntax()
	default:
		return command{}, pgerror.Newf(syntaxError, "unknown admin command %q", pgerror.Clip(w)).
			WithHint("The pgwarden admin console understands: " + usage + ".")
	}
}

func (l *lexer) show() (command, error) {
	l.skip()
	v := strings.ToLower(l.word())
	for _, known := range views {
		if v == known {
			return command{op: opShow, view: v}, nil
		}
	}
	if v == "" {
		return command{}, l.syntax()
	}
	return command{}, pgerror.Newf(syntaxError, "unknown SHOW %q", pgerror.Clip(v)).
		WithHint("SHOW takes one of POOLS, CLIENTS, SERVERS, STATS, DATABASES, CONFIG, LEASES, HELP.")
}

// killHint keeps PgBouncer users from expecting KILL db.
const killHint = "KILL takes a client id (SHOW CLIENTS, column id) or SUBJECT '<subject>'; " +
	"PgBouncer's KILL <db> is not supported."

func (l *lexer) kill() (command, error) {
	l.skip()
	save := l.pos
	if strings.EqualFold(l.word(), "SUBJECT") {
		l.skip()
		sub, ok := l.quoted('\'')
		switch {
		case !ok:
			return command{}, l.syntax().WithHint(killHint)
		case sub == "":
			return command{}, pgerror.New(pgerror.InvalidParameterValue, "KILL SUBJECT needs a non-empty subject")
		}
		return command{op: opKillSubject, subject: sub}, nil
	}
	l.pos = save
	return l.killClient()
}

func (l *lexer) killClient() (command, error) {
	l.skip()
	start := l.pos
	w := l.word()
	if w == "" || strings.TrimLeft(w, "0123456789") != "" {
		l.pos = start
		return command{}, l.syntax().WithHint(killHint)
	}
	id, err := strconv.ParseUint(w, 10, 64)
	if err != nil {
		return command{}, pgerror.Newf(pgerror.InvalidParameterValue, "client id %s is out of range", pgerror.Clip(w))
	}
	return command{op: opKill, client: id}, nil
}

// optIdent reads an optional database name.
func (l *lexer) optIdent() (string, error) {
	l.skip()
	if l.eof() || l.s[l.pos] == ';' {
		return "", nil
	}
	if l.s[l.pos] == '"' {
		name, ok := l.quoted('"')
		switch {
		case !ok:
			return "", l.syntax()
		case name == "":
			return "", pgerror.New(syntaxError, "zero-length delimited identifier")
		}
		return name, nil
	}
	if w := l.word(); w != "" {
		return w, nil
	}
	return "", l.syntax()
}

// end accepts the end of the statement: semicolons and nothing else.
func (l *lexer) end() error {
	l.skip()
	if !l.eof() && l.s[l.pos] != ';' {
		return l.syntax()
	}
	l.skipSemis()
	if !l.eof() {
		return pgerror.New(pgerror.FeatureNotSupported, "the admin console runs one command per query").
			WithHint("Send each command as its own query; nothing of this one ran.")
	}
	return nil
}

// verb is the command word for CommandComplete and the log.
func (c command) verb() string {
	switch c.op {
	case opShow:
		return "SHOW"
	case opReload:
		return "RELOAD"
	case opPause:
		return "PAUSE"
	case opResume:
		return "RESUME"
	case opKill, opKillSubject:
		return "KILL"
	}
	return ""
}

// String is the command in canonical form; parse(c.String()) gives c back.
func (c command) String() string {
	switch c.op {
	case opShow:
		return "SHOW " + strings.ToUpper(c.view)
	case opPause, opResume:
		if c.database == "" {
			return c.verb()
		}
		return c.verb() + " " + quoteIdent(c.database)
	case opKill:
		return "KILL " + strconv.FormatUint(c.client, 10)
	case opKillSubject:
		return "KILL SUBJECT '" + strings.ReplaceAll(c.subject, "'", "''") + "'"
	}
	return c.verb()
}

// quoteIdent writes name bare when the lexer reads it back as one word.
func quoteIdent(name string) string {
	bare := name != ""
	for i := 0; i < len(name); i++ {
		bare = bare && isWord(name[i])
	}
	if bare {
		return name
	}
	return `"` + strings.ReplaceAll(name, `"`, `""`) + `"`
}

// lexer walks a query string. err is sticky: an unterminated comment.
type lexer struct {
	s   string
	pos int
	err error
}

func (l *lexer) eof() bool { return l.pos >= len(l.s) }

// isWord reports whether b belongs to a bare word: ASCII letters, digits,
// '_', '$', and any byte of a multi-byte UTF-8 character, as in PostgreSQL's
// unquoted identifiers.
func isWord(b byte) bool {
	return b == '_' || b == '$' || b >= 0x80 ||
		'a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' || '0' <= b && b <= '9'
}

// word skips space and returns the bare word at the cursor, possibly "".
func (l *lexer) word() string {
	l.skip()
	start := l.pos
	for !l.eof() && isWord(l.s[l.pos]) {
		l.pos++
	}
	return l.s[start:l.pos]
}

// quoted reads a literal delimited by q in which a doubled q stands for one.
// ok is false when the cursor is not at q or the literal does not end.
func (l *lexer) quoted(q byte) (s string, ok bool) {
	if l.eof() || l.s[l.pos] != q {
		return "", false
	}
	var b strings.Builder
	for i := l.pos + 1; i < len(l.s); i++ {
		if l.s[i] != q {
			b.WriteByte(l.s[i])
			continue
		}
		if i+1 < len(l.s) && l.s[i+1] == q {
			b.WriteByte(q)
			i++
			continue
		}
		l.pos = i + 1
		return b.String(), true
	}
	return "", false
}

// skip passes whitespace and comments. Block comments nest, as in
// PostgreSQL; an unterminated one sets l.err.
func (l *lexer) skip() {
	for !l.eof() {
		rest := l.s[l.pos:]
		switch {
		case strings.IndexByte(" \t\n\r\f\v", rest[0]) >= 0:
			l.pos++
		case strings.HasPrefix(rest, "--"):
			if i := strings.IndexByte(rest, '\n'); i >= 0 {
				l.pos += i + 1
			} else {
				l.pos = len(l.s)
			}
		case strings.HasPrefix(rest, "/*"):
			l.blockComment()
		default:
			return
		}
	}
}

func (l *lexer) blockComment() {
	depth := 0
	for l.pos < len(l.s) {
		switch rest := l.s[l.pos:]; {
		case strings.HasPrefix(rest, "/*"):
			depth++
			l.pos += 2
		case strings.HasPrefix(rest, "*/"):
			depth--
			l.pos += 2
			if depth == 0 {
				return
			}
		default:
			l.pos++
		}
	}
	if l.err == nil {
		l.err = pgerror.New(syntaxError, "unterminated /* comment")
	}
}

// skipSemis passes whitespace, comments and empty statements.
func (l *lexer) skipSemis() {
	for l.skip(); !l.eof() && l.s[l.pos] == ';'; l.skip() {
		l.pos++
	}
}

// syntax is PostgreSQL's "syntax error at or near" for the cursor's token.
func (l *lexer) syntax() *pgerror.Error {
	l.skip()
	if l.eof() {
		return pgerror.New(syntaxError, "syntax error at end of input").
			WithHint("The pgwarden admin console understands: " + usage + ".")
	}
	tok := l.s[l.pos:]
	if n := strings.IndexAny(tok, " \t\n\r\f\v;"); n > 0 {
		tok = tok[:n]
	}
	return pgerror.Newf(syntaxError, "syntax error at or near %q", pgerror.Clip(tok)).
		WithHint("The pgwarden admin console understands: " + usage + ".")
}
