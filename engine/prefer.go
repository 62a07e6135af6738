package engine

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Preferences are what a request asks for in its Prefer headers (RFC 7240) that this server
// honours.
type Preferences struct {
	RespondAsync bool
	// Wait is set when the client sent wait=N.
	Wait    time.Duration
	HasWait bool
}

// maxPreferLength bounds the Prefer headers of one request, all together.
const maxPreferLength = 1024

// errPrefer is wrapped by every Prefer parsing error.
var errPrefer = errors.New("malformed Prefer header")

// ParsePrefer reads every Prefer header of h. Preferences this server does not know are
// ignored, as RFC 7240 asks; a wait that is not a whole number of seconds is an error, because
// a client that sent it evidently meant to wait and should learn why it did not.
func ParsePrefer(h http.Header) (Preferences, error) {
	var p Preferences
	values := h.Values("Prefer")
	total := 0
	for _, v := range values {
		total += len(v)
	}
	if total > maxPreferLength {
		return p, fmt.Errorf("%w: longer than %d bytes", errPrefer, maxPreferLength)
	}
	for _, v := range values {
		for _, pref := range strings.Split(v, ",") {
			// Parameters after ';' do not matter for the two preferences we honour.
			token, _, _ := strings.Cut(pref, ";")
			name, value, hasValue := strings.Cut(strings.TrimSpace(token), "=")
			name = strings.ToLower(strings.TrimSpace(name))
			value = strings.Trim(strings.TrimSpace(value), `"`)
			switch name {
			case "respond-async":
				p.RespondAsync = true
			case "wait":
				if !hasValue {
					return p, fmt.Errorf("%w: wait needs a number of seconds, as in wait=10", errPrefer)
				}
				secs, err := strconv.ParseUint(value, 10, 32)
				if err != nil {
					return p, fmt.Errorf("%w: wait=%q is not a whole number of seconds", errPrefer, value)
				}
				p.Wait, p.HasWait = time.Duration(secs)*time.Second, true
			}
		}
	}
	return p, nil
}
