package upstreamhook

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strings"
	"unicode/utf8"
)

// The headers the sidecar adds to a proxied request that became a job (DESIGN.md section 4).
const (
	HeaderJobID    = "Progress-Job-Id"
	HeaderCallback = "Progress-Callback"
	HeaderToken    = "Progress-Token"
)

// Update is one progress report: the JSON body of a callback. Nil pointers and empty strings
// are fields the report leaves as they were.
type Update struct {
	Percent *float64        `json:"percent,omitempty"`
	Current *float64        `json:"current,omitempty"`
	Total   *float64        `json:"total,omitempty"`
	Stage   string          `json:"stage,omitempty"`
	Message string          `json:"message,omitempty"`
	Data    json.RawMessage `json:"data,omitempty"`
}

// Float returns a pointer to v, for Update's numeric fields.
func Float(v float64) *float64 { return &v }

// Limits bound a callback body. Zero fields take the defaults below.
type Limits struct {
	MaxBody    int64 // the whole body, bytes
	MaxStage   int   // stage, bytes
	MaxMessage int   // message, bytes
	MaxData    int   // data, bytes of JSON
}

// Default limits of a callback body.
const (
	DefaultMaxBody    = 64 << 10
	DefaultMaxStage   = 256
	DefaultMaxMessage = 4 << 10
	DefaultMaxData    = 16 << 10
)

func (l Limits) withDefaults() Limits {
	if l.MaxBody <= 0 {
		l.MaxBody = DefaultMaxBody
	}
	if l.MaxStage <= 0 {
		l.MaxStage = DefaultMaxStage
	}
	if l.MaxMessage <= 0 {
		l.MaxMessage = DefaultMaxMessage
	}
	if l.MaxData <= 0 {
		l.MaxData = DefaultMaxData
	}
	return l
}

// FieldError says which field of a callback body is wrong and why (a 400).
type FieldError struct {
	Field  string // JSON name of the field; "" for the body as a whole
	Reason string
}

func (e *FieldError) Error() string {
	if e.Field == "" {
		return e.Reason
	}
	return e.Field + ": " + e.Reason
}

// TooLargeError says a callback body or one of its fields exceeds its limit (a 413).
type TooLargeError struct {
	Field string // "" for the whole body
	Limit int64
}

func (e *TooLargeError) Error() string {
	what := "body"
	if e.Field != "" {
		what = e.Field
	}
	return fmt.Sprintf("%s is larger than %d bytes", what, e.Limit)
}

// ParseUpdate reads and validates a callback body. Errors are *FieldError or *TooLargeError.
func ParseUpdate(body io.Reader, limits Limits) (Update, error) {
	limits = limits.withDefaults()
	raw, err := io.ReadAll(io.LimitReader(body, limits.MaxBody+1))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return Update{}, &TooLargeError{Limit: limits.MaxBody}
		}
		return Update{}, &FieldError{Reason: "reading the body: " + err.Error()}
	}
	if int64(len(raw)) > limits.MaxBody {
		return Update{}, &TooLargeError{Limit: limits.MaxBody}
	}
	if !utf8.Valid(raw) {
		return Update{}, &FieldError{Reason: "the body is not valid UTF-8"}
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil || fields == nil {
		return Update{}, &FieldError{Reason: "the body must be one JSON object, such as {\"percent\": 40}"}
	}
	var u Update
	for name, value := range fields {
		var err error
		switch name {
		case "percent":
			u.Percent, err = number(name, value, 0, 100)
		case "current":
			u.Current, err = number(name, value, 0, math.MaxFloat64)
		case "total":
			u.Total, err = number(name, value, 0, math.MaxFloat64)
		case "stage":
			u.Stage, err = text(name, value, limits.MaxStage)
		case "message":
			u.Message, err = text(name, value, limits.MaxMessage)
		case "data":
			u.Data, err = object(name, value, limits.MaxData)
		default:
			err = &FieldError{Field: name, Reason: "unknown field; known are percent, current, total, stage, message, data"}
		}
		if err != nil {
			return Update{}, err
		}
	}
	// Checked on the parsed update, not on the number of keys: an empty string leaves its field
	// as it was, so {"stage": ""} says nothing, and the JSON the update is written back as
	// (omitempty) would be {} and rejected.
	if u.Percent == nil && u.Current == nil && u.Total == nil && u.Stage == "" && u.Message == "" && u.Data == nil {
		return Update{}, &FieldError{Reason: "empty update: give percent, current and total, stage, message or data"}
	}
	if u.Current != nil && u.Total != nil && *u.Current > *u.Total {
		return Update{}, &FieldError{Field: "current", Reason: fmt.Sprintf("%g is more than total %g", *u.Current, *u.Total)}
	}
	return u, nil
}

func number(name string, value json.RawMessage, min, max float64) (*float64, error) {
	var v float64
	if err := json.Unmarshal(value, &v); err != nil || bytes.Equal(bytes.TrimSpace(value), []byte("null")) {
		return nil, &FieldError{Field: name, Reason: "must be a number"}
	}
	if v < min || v > max {
		if max == math.MaxFloat64 {
			return nil, &FieldError{Field: name, Reason: fmt.Sprintf("%g is negative", v)}
		}
		return nil, &FieldError{Field: name, Reason: fmt.Sprintf("%g is outside %g..%g", v, min, max)}
	}
	return &v, nil
}

func text(name string, value json.RawMessage, limit int) (string, error) {
	var s string
	if err := json.Unmarshal(value, &s); err != nil || bytes.Equal(bytes.TrimSpace(value), []byte("null")) {
		return "", &FieldError{Field: name, Reason: "must be a string"}
	}
	if len(s) > limit {
		return "", &TooLargeError{Field: name, Limit: int64(limit)}
	}
	return s, nil
}

func object(name string, value json.RawMessage, limit int) (json.RawMessage, error) {
	trimmed := bytes.TrimSpace(value)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return nil, &FieldError{Field: name, Reason: "must be a JSON object"}
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, trimmed); err != nil {
		return nil, &FieldError{Field: name, Reason: "must be a JSON object"}
	}
	if compact.Len() > limit {
		return nil, &TooLargeError{Field: name, Limit: int64(limit)}
	}
	return compact.Bytes(), nil
}

// Signer makes and checks per-job callback tokens: an HMAC of the job id under a key derived
// from the server's secret, so a token is useless for any other job.
type Signer struct {
	key []byte
}

// NewSigner derives the token key from secret (the store's, or one set in the config).
func NewSigner(secret []byte) *Signer {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte("caddy-progress callback token v1"))
	return &Signer{key: m.Sum(nil)}
}

// Token is the callback token of job id.
func (s *Signer) Token(id string) string {
	return base64.RawURLEncoding.EncodeToString(s.mac(id))
}

// Check reports whether token is job id's, in time independent of where they differ.
//
// It compares the encoded forms rather than decoding token: the base64 decoder skips newlines
// and ignores the two unused low bits of the last character, so several strings decode to the
// same MAC, and a token must have exactly one spelling.
func (s *Signer) Check(id, token string) bool {
	return hmac.Equal([]byte(token), []byte(s.Token(id)))
}

func (s *Signer) mac(id string) []byte {
	m := hmac.New(sha256.New, s.key)
	m.Write([]byte(id))
	return m.Sum(nil)
}

// BearerToken returns the token of an "Authorization: Bearer <token>" header.
func BearerToken(r *http.Request) (string, bool) {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	token = strings.TrimSpace(token)
	return token, token != ""
}
