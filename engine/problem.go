package engine

import (
	"encoding/json"
	"net/http"
	"strconv"
)

// Problem is an RFC 9457 problem document: what went wrong, in words a person can act on.
type Problem struct {
	Type   string `json:"type"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail,omitempty"`
	// Field names the request field at fault, when one is (an RFC 9457 extension member).
	Field string `json:"field,omitempty"`
	// RetryAfter, in seconds, is sent as the Retry-After header when set.
	RetryAfter int `json:"-"`
}

// problemBase is where problem types are explained (README, section "Errors").
const problemBase = "https://github.com/caddy-progress/progress#problem-"

// NewProblem makes a problem whose type is explained in the README's section "Errors" under
// slug.
func NewProblem(status int, slug, title, detail string) *Problem {
	return problem(status, slug, title, detail)
}

func problem(status int, slug, title, detail string) *Problem {
	return &Problem{Type: problemBase + slug, Title: title, Status: status, Detail: detail}
}

// Error makes a Problem usable as an error, so handlers can return it.
func (p *Problem) Error() string { return p.Title + ": " + p.Detail }

// Write sends the problem document.
func (p *Problem) Write(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Type", "application/problem+json")
	h.Set("Cache-Control", "no-store")
	h.Del("Content-Length")
	if p.RetryAfter > 0 {
		h.Set("Retry-After", strconv.Itoa(p.RetryAfter))
	}
	w.WriteHeader(p.Status)
	json.NewEncoder(w).Encode(p)
}
