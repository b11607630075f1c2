// Package pgerror tags internal failures with the PostgreSQL SQLSTATE a client
// should see, where they arise, so that the connection edge can recover the code
// by walking the wrap chain instead of matching strings.
//
// It is a leaf package: authn, broker and proxy all import it, it imports
// nothing of theirs. Messages carried here reach clients; they must never hold a
// token, password or leased credential.
package pgerror

import (
	"errors"
	"fmt"
	"unicode/utf8"
)

// SQLSTATE codes pgwarden sends. See
// https://www.postgresql.org/docs/current/errcodes-appendix.html.
const (
	SuccessfulCompletion   = "00000" // successful_completion: the code of a NOTICE
	ProtocolViolation      = "08P01" // protocol_violation
	ConnectionFailure      = "08006" // connection_failure
	InvalidAuthorization   = "28000" // invalid_authorization_specification
	InvalidPassword        = "28P01" // invalid_password
	InsufficientPrivilege  = "42501" // insufficient_privilege
	InvalidCatalogName     = "3D000" // invalid_catalog_name: unknown database
	FeatureNotSupported    = "0A000" // feature_not_supported
	TooManyConnections     = "53300" // too_many_connections
	AdminShutdown          = "57P01" // admin_shutdown
	InternalError          = "XX000" // internal_error
	ConfigurationFileError = "F0000" // config_file_error
	InvalidParameterValue  = "22023" // invalid_parameter_value
	ProgramLimitExceeded   = "54000" // program_limit_exceeded
	SyntaxError            = "42601" // syntax_error
	ObjectInUse            = "55006" // object_in_use
	CredentialLeaseEnded   = AdminShutdown
)

// Error is a failure that carries the SQLSTATE and client-facing text for the
// ErrorResponse pgwarden will send. Message, Detail and Hint are shown to the
// client verbatim and must never contain secrets. Err is the cause, kept for
// logs and errors.Is/As; it is not shown to the client.
type Error struct {
	Code    string
	Message string
	Detail  string
	Hint    string
	Err     error
}

// New returns an *Error with code and message.
func New(code, message string) *Error { return &Error{Code: code, Message: message} }

// Newf is New with fmt.Sprintf formatting.
func Newf(code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Wrap tags err with code and a client-facing message. It returns nil when err
// is nil.
func Wrap(err error, code, message string) error {
	if err == nil {
		return nil
	}
	return &Error{Code: code, Message: message, Err: err}
}

// Error implements error. It includes the cause, so it is for logs, not clients.
func (e *Error) Error() string {
	if e.Err != nil {
		return e.Message + ": " + e.Err.Error()
	}
	return e.Message
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// WithHint returns e with its hint set; it modifies and returns e.
func (e *Error) WithHint(hint string) *Error { e.Hint = hint; return e }

// WithDetail returns e with its detail set; it modifies and returns e.
func (e *Error) WithDetail(detail string) *Error { e.Detail = detail; return e }

// From returns the outermost *Error in err's chain. When there is none it
// returns an *Error with InternalError and a generic message, so that an
// untagged internal failure never leaks its text to a client. From(nil) is nil.
func From(err error) *Error {
	if err == nil {
		return nil
	}
	var pe *Error
	if errors.As(err, &pe) {
		return pe
	}
	return &Error{Code: InternalError, Message: "pgwarden internal error", Err: err}
}

// Code returns the SQLSTATE of the outermost *Error in err's chain, or
// InternalError when there is none.
func Code(err error) string { return From(err).Code }

// clipLen is how much of a client-supplied name an error message quotes.
const clipLen = 64

// Clip shortens text a client supplied (a database or level name, a startup
// option) for quoting in an error message or a log line: such text can be
// kilobytes long before the client has proved who it is, and every refused
// attempt is logged. It keeps the first 64 bytes, cut at a rune boundary,
// and marks the cut with "…".
func Clip(s string) string {
	if len(s) <= clipLen {
		return s
	}
	cut := clipLen
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}
