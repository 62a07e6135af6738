package upstreamhook

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
)

func TestParseUpdateAccepts(t *testing.T) {
	tests := []struct {
		body string
		want Update
	}{
		{`{"percent": 40}`, Update{Percent: Float(40)}},
		{`{"percent": 0}`, Update{Percent: Float(0)}},
		{`{"percent": 100}`, Update{Percent: Float(100)}},
		{`{"current": 4, "total": 10}`, Update{Current: Float(4), Total: Float(10)}},
		{`{"current": 10, "total": 10}`, Update{Current: Float(10), Total: Float(10)}},
		{`{"current": 7}`, Update{Current: Float(7)}},
		{`{"stage": "resize", "message": "image 4 of 10"}`, Update{Stage: "resize", Message: "image 4 of 10"}},
		{`{"data": { "rows" : [1, 2] }}`, Update{Data: json.RawMessage(`{"rows":[1,2]}`)}},
		{` {"percent": 1.5, "stage": "é"} `, Update{Percent: Float(1.5), Stage: "é"}},
	}
	for _, tt := range tests {
		got, err := ParseUpdate(strings.NewReader(tt.body), Limits{})
		if err != nil {
			t.Errorf("%s: %v", tt.body, err)
			continue
		}
		if !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: got %s, want %s", tt.body, show(got), show(tt.want))
		}
	}
}

func TestParseUpdateRejects(t *testing.T) {
	long := func(n int) string { return strings.Repeat("a", n) }
	tests := []struct {
		name     string
		body     string
		limits   Limits
		field    string // the field the error must name; "" for the body as a whole
		tooLarge bool   // a *TooLargeError rather than a *FieldError
	}{
		{name: "percent below 0", body: `{"percent": -1}`, field: "percent"},
		{name: "percent above 100", body: `{"percent": 101}`, field: "percent"},
		{name: "percent a string", body: `{"percent": "x"}`, field: "percent"},
		{name: "percent null", body: `{"percent": null}`, field: "percent"},
		{name: "percent out of float range", body: `{"percent": 1e400}`, field: "percent"},
		{name: "current null", body: `{"current": null}`, field: "current"},
		{name: "current negative", body: `{"current": -3}`, field: "current"},
		{name: "current above total", body: `{"current": 11, "total": 10}`, field: "current"},
		{name: "total negative", body: `{"total": -1}`, field: "total"},
		{name: "total a bool", body: `{"total": true}`, field: "total"},
		{name: "stage a number", body: `{"stage": 3}`, field: "stage"},
		{name: "stage null", body: `{"stage": null}`, field: "stage"},
		{name: "message an object", body: `{"message": {}}`, field: "message"},
		{name: "stage too long", body: `{"stage": "` + long(DefaultMaxStage+1) + `"}`, field: "stage", tooLarge: true},
		{name: "message too long", body: `{"message": "` + long(DefaultMaxMessage+1) + `"}`, field: "message", tooLarge: true},
		{name: "data too long", body: `{"data": {"a": "` + long(DefaultMaxData) + `"}}`, field: "data", tooLarge: true},
		{name: "stage over a set limit", body: `{"stage": "abcde"}`, limits: Limits{MaxStage: 4}, field: "stage", tooLarge: true},
		{name: "data an array", body: `{"data": [1]}`, field: "data"},
		{name: "data a string", body: `{"data": "x"}`, field: "data"},
		{name: "data null", body: `{"data": null}`, field: "data"},
		{name: "unknown field", body: `{"percent": 1, "eta": 5}`, field: "eta"},
		{name: "field names are case-sensitive", body: `{"Percent": 1}`, field: "Percent"},
		{name: "empty object", body: `{}`},
		{name: "only empty strings", body: `{"stage": "", "message": ""}`},
		{name: "an array", body: `[{"percent": 1}]`},
		{name: "a number", body: `40`},
		{name: "null", body: `null`},
		{name: "empty body", body: ``},
		{name: "two objects", body: `{"percent": 1} {"percent": 2}`},
		{name: "truncated", body: `{"percent": 1`},
		{name: "invalid UTF-8", body: "{\"stage\": \"\xff\"}"},
		{name: "body over MaxBody", body: `{"message": "` + long(DefaultMaxBody) + `"}`, tooLarge: true},
		{name: "body over a set MaxBody", body: `{"percent": 40}`, limits: Limits{MaxBody: 10}, tooLarge: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u, err := ParseUpdate(strings.NewReader(tt.body), tt.limits)
			if err == nil {
				t.Fatalf("accepted as %s", show(u))
			}
			var fe *FieldError
			var tl *TooLargeError
			switch {
			case tt.tooLarge && errors.As(err, &tl):
				if tl.Field != tt.field {
					t.Fatalf("names %q, want %q: %v", tl.Field, tt.field, err)
				}
				if tl.Limit <= 0 || !strings.Contains(err.Error(), "larger than") {
					t.Fatalf("no limit in %v", err)
				}
			case !tt.tooLarge && errors.As(err, &fe):
				if fe.Field != tt.field {
					t.Fatalf("names %q, want %q: %v", fe.Field, tt.field, err)
				}
				if tt.field != "" && !strings.HasPrefix(err.Error(), tt.field+": ") {
					t.Fatalf("message does not start with the field: %v", err)
				}
			default:
				t.Fatalf("%T %v", err, err)
			}
		})
	}
}

func TestParseUpdateReadError(t *testing.T) {
	_, err := ParseUpdate(iotest.ErrReader(errors.New("connection reset")), Limits{})
	var fe *FieldError
	if !errors.As(err, &fe) || !strings.Contains(err.Error(), "connection reset") {
		t.Fatalf("%T %v", err, err)
	}
	// A body the server cut with http.MaxBytesReader is too large, not malformed.
	body := http.MaxBytesReader(nil, io.NopCloser(strings.NewReader(`{"percent": 40}`)), 5)
	_, err = ParseUpdate(body, Limits{})
	var tl *TooLargeError
	if !errors.As(err, &tl) {
		t.Fatalf("%T %v", err, err)
	}
}

func TestSigner(t *testing.T) {
	s := NewSigner([]byte("secret"))
	tok := s.Token("job-1")
	if !s.Check("job-1", tok) {
		t.Fatal("a job's own token does not check")
	}
	if tok == s.Token("job-2") || s.Check("job-2", tok) {
		t.Fatal("a token checks for another job")
	}
	if other := NewSigner([]byte("other secret")); other.Check("job-1", tok) {
		t.Fatal("a token checks under another secret")
	}
	if NewSigner([]byte("secret")).Token("job-1") != tok {
		t.Fatal("tokens are not stable across signers with the same secret")
	}
	bad := map[string]string{
		"empty":        "",
		"truncated":    tok[:len(tok)-1],
		"extended":     tok + "A",
		"padded":       tok + "=",
		"newline":      tok[:10] + "\n" + tok[10:],
		"not base64":   "!!" + tok[2:],
		"std alphabet": strings.NewReplacer("-", "+", "_", "/").Replace(tok) + "+/",
	}
	// Every change of one character must fail, including the last one, whose low bits
	// carry no data: a lenient decoder would accept some of those.
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	for i := range len(tok) {
		for _, c := range []byte(alphabet) {
			if c != tok[i] {
				bad[fmt.Sprintf("altered at %d to %c", i, c)] = tok[:i] + string(c) + tok[i+1:]
			}
		}
	}
	for name, b := range bad {
		if s.Check("job-1", b) {
			t.Errorf("%s token %q checks", name, b)
		}
	}
}

func TestBearerToken(t *testing.T) {
	tests := []struct {
		header string
		want   string
		ok     bool
	}{
		{"Bearer abc", "abc", true},
		{"bearer abc", "abc", true},
		{"BEARER  abc ", "abc", true},
		{"", "", false},
		{"Bearer", "", false},
		{"Bearer ", "", false},
		{"Basic abc", "", false},
		{"Bearerabc", "", false},
	}
	for _, tt := range tests {
		r, _ := http.NewRequest("POST", "http://example.test/", nil)
		if tt.header != "" {
			r.Header.Set("Authorization", tt.header)
		}
		got, ok := BearerToken(r)
		if got != tt.want || ok != tt.ok {
			t.Errorf("%q: got %q %v, want %q %v", tt.header, got, ok, tt.want, tt.ok)
		}
	}
}

// FuzzParseUpdate checks that ParseUpdate never panics, and that whatever it accepts, written
// back as JSON by the client's encoder, is accepted again with the same values.
func FuzzParseUpdate(f *testing.F) {
	for _, seed := range []string{
		`{"percent": 40}`,
		`{"current": 4, "total": 10, "stage": "resize", "message": "4 of 10", "data": {"a": [1, {"b": null}]}}`,
		`{"percent": -0}`,
		`{"percent": 1e2}`,
		`{"total": 1.7976931348623157e308, "current": 5e-324}`,
		`{"stage": "<&>\u2028", "data": {"html": "<b>&amp;</b>"}}`,
		`{"message": "\ud800"}`,
		`{"data": {}}`,
		`{"stage": ""}`,
		`{"percent": 1, "percent": 2}`,
		`{}`,
		`[]`,
		`null`,
		"{\"stage\": \"\xff\"}",
		`{"percent": "40"}`,
		// Near the data limit below, and six times over it if "<" were escaped as \u003c.
		`{"data": {"a": "` + strings.Repeat("<", 1000) + `"}}`,
	} {
		f.Add([]byte(seed))
	}
	limits := Limits{MaxBody: 4 << 10, MaxStage: 64, MaxMessage: 256, MaxData: 1 << 10}
	f.Fuzz(func(t *testing.T, body []byte) {
		u, err := ParseUpdate(bytes.NewReader(body), limits)
		if err != nil {
			var fe *FieldError
			var tl *TooLargeError
			if !errors.As(err, &fe) && !errors.As(err, &tl) {
				t.Fatalf("error of type %T: %v", err, err)
			}
			return
		}
		again, err := encode(u)
		if err != nil {
			t.Fatalf("accepted %q as %s, which does not encode: %v", body, show(u), err)
		}
		v, err := ParseUpdate(bytes.NewReader(again), limits)
		if err != nil {
			t.Fatalf("accepted %q, but not its re-encoding %q: %v", body, again, err)
		}
		if !sameUpdate(u, v) {
			t.Fatalf("%q parsed as %s, re-encoded %q parsed as %s", body, show(u), again, show(v))
		}
	})
}

// sameUpdate compares two updates by value: Data as the JSON value it holds.
func sameUpdate(a, b Update) bool {
	eqf := func(x, y *float64) bool {
		if x == nil || y == nil {
			return x == y
		}
		return *x == *y && math.Signbit(*x) == math.Signbit(*y)
	}
	if !eqf(a.Percent, b.Percent) || !eqf(a.Current, b.Current) || !eqf(a.Total, b.Total) ||
		a.Stage != b.Stage || a.Message != b.Message {
		return false
	}
	if (a.Data == nil) != (b.Data == nil) {
		return false
	}
	if a.Data == nil {
		return true
	}
	var x, y any
	if json.Unmarshal(a.Data, &x) != nil || json.Unmarshal(b.Data, &y) != nil {
		return false
	}
	return reflect.DeepEqual(x, y)
}

func show(u Update) string {
	b, err := json.Marshal(u)
	if err != nil {
		return err.Error()
	}
	return string(b)
}
