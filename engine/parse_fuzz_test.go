package engine

import (
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Fuzz targets for every parser of what a client sends to the job API or a job route (issue
// 7): Prefer, ?wait=, ?after= and If-None-Match, Last-Event-ID and ?last_event_id=, Accept.
// Each checks properties, not just the absence of a panic: what is accepted is in range, and
// what the server itself would write parses back to the same value. The seed corpus lives in
// testdata/fuzz/<target>/; `./xcaddy.sh test` runs every target for FUZZTIME_CI each.

// FuzzParsePrefer: header holds one or more Prefer header values separated by NUL (a byte no
// header value can hold).
func FuzzParsePrefer(f *testing.F) {
	for _, seed := range []string{
		"respond-async", "respond-async, wait=10", "wait=5\x00handling=lenient",
		`Respond-Async; foo=bar, WAIT="3"`, "wait=abc", "wait", "wait=4294967295", "wait=4294967296",
		"wait=-1", "wait= 7 ", "respond-async;wait=3", ",,,;;;==", strings.Repeat("a,", 600),
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, header string) {
		values := strings.Split(header, "\x00")
		p, err := ParsePrefer(http.Header{"Prefer": values})
		total := 0
		for _, v := range values {
			total += len(v)
		}
		if err != nil {
			if !errors.Is(err, errPrefer) {
				t.Fatalf("%q: error %v does not wrap errPrefer", header, err)
			}
			return
		}
		if total > maxPreferLength {
			t.Fatalf("%q: accepted %d bytes, over the %d limit", header, total, maxPreferLength)
		}
		if p.Wait < 0 || p.Wait%time.Second != 0 || p.Wait > time.Duration(1<<32-1)*time.Second {
			t.Fatalf("%q: wait %v out of range", header, p.Wait)
		}
		if !p.HasWait && p.Wait != 0 {
			t.Fatalf("%q: wait %v without HasWait", header, p.Wait)
		}
		if p.RespondAsync && !strings.Contains(strings.ToLower(header), "respond-async") {
			t.Fatalf("%q: respond-async from a header that does not name it", header)
		}
		if p.HasWait && !strings.Contains(strings.ToLower(header), "wait") {
			t.Fatalf("%q: wait from a header that does not name it", header)
		}
		// What a client library would write for these preferences reads back the same.
		var parts []string
		if p.RespondAsync {
			parts = append(parts, "respond-async")
		}
		if p.HasWait {
			parts = append(parts, "wait="+strconv.FormatInt(int64(p.Wait/time.Second), 10))
		}
		again, err := ParsePrefer(http.Header{"Prefer": {strings.Join(parts, ", ")}})
		if err != nil || again != p {
			t.Fatalf("%q parsed as %+v; written back %q parsed as %+v, %v", header, p, strings.Join(parts, ", "), again, err)
		}
	})
}

// FuzzParseWait: the ?wait= query parameter of long-poll and /result.
func FuzzParseWait(f *testing.F) {
	for _, seed := range []string{"30", "30s", "1m30s", "0", "-1s", "1e3s", "4294967295", "4294967296",
		"9223372036854775807ns", "9223372036854775808ns", "2562047h47m16.854775807s", ".5s", "1.5h", "", "abc",
		strings.Repeat("9", 40)} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, q string) {
		d, err := parseWait(q)
		if err != nil {
			return
		}
		if len(q) > 32 {
			t.Fatalf("%q: accepted a wait of %d bytes", q, len(q))
		}
		if d < 0 {
			t.Fatalf("%q: negative wait %v", q, d)
		}
		// The duration's own spelling reads back the same (the API caps it at max_wait later).
		if s := d.String(); len(s) <= 32 {
			again, err := parseWait(s)
			if err != nil || again != d {
				t.Fatalf("%q is %v; %q reads back as %v, %v", q, d, s, again, err)
			}
		}
	})
}

// FuzzSeenSeq: ?after= and If-None-Match, the seq a long-poll client has seen.
func FuzzSeenSeq(f *testing.F) {
	for _, seed := range [][2]string{
		{"", `"7"`}, {"7", ""}, {"", `W/"3", "9", "x"`}, {"", `*`}, {"", `"18446744073709551615"`},
		{"", `"18446744073709551616"`}, {"007", ""}, {"-1", ""}, {"", `""`}, {"", `"`}, {"", strings.Repeat(`"1",`, 20)},
		{"12", `"99"`}, {"1 ", ""},
	} {
		f.Add(seed[0], seed[1])
	}
	f.Fuzz(func(t *testing.T, after, inm string) {
		r := getRequest("after="+url.QueryEscape(after), nil)
		if inm != "" {
			r.Header["If-None-Match"] = []string{inm}
		}
		n, found, err := seenSeq(r)
		if err != nil {
			var p *Problem
			if !errors.As(err, &p) || p.Status != http.StatusBadRequest {
				t.Fatalf("after %q, If-None-Match %q: error %v is not a 400 problem", after, inm, err)
			}
			if after == "" && len(inm) <= 64 {
				t.Fatalf("If-None-Match %q of %d bytes refused: %v", inm, len(inm), err)
			}
			return
		}
		switch {
		case after != "":
			if !found || strconv.FormatUint(n, 10) != trimZeros(after) {
				t.Fatalf("after %q read as %d (found %v)", after, n, found)
			}
		case inm == "":
			if found || n != 0 {
				t.Fatalf("nothing sent, but seq %d found", n)
			}
		case len(inm) > 64:
			t.Fatalf("If-None-Match of %d bytes accepted", len(inm))
		case found && !strings.Contains(inm, `"`+strconv.FormatUint(n, 10)) && !strings.Contains(inm, `"0`):
			t.Fatalf("If-None-Match %q read as seq %d, which it does not name", inm, n)
		}
		// The ETag the server sends reads back as its seq.
		r = getRequest("", http.Header{"If-None-Match": {etag(n)}})
		if again, ok, err := seenSeq(r); err != nil || !ok || again != n {
			t.Fatalf("ETag %s read back as %d %v %v", etag(n), again, ok, err)
		}
	})
}

// FuzzLastEventID: the Last-Event-ID header and ?last_event_id=, which wins over it.
func FuzzLastEventID(f *testing.F) {
	for _, seed := range [][2]string{
		{"7", ""}, {"", "7"}, {"3", "9"}, {"18446744073709551615", ""}, {"18446744073709551616", ""},
		{"-1", ""}, {"0x10", ""}, {"1_000", ""}, {"", "%0A"}, {" 5", ""}, {"", "id: 5\ndata: x"},
	} {
		f.Add(seed[0], seed[1])
	}
	f.Fuzz(func(t *testing.T, header, query string) {
		r := getRequest("last_event_id="+url.QueryEscape(query), nil)
		if header != "" {
			r.Header["Last-Event-Id"] = []string{header}
		}
		used := header
		if query != "" {
			used = query
		}
		n, resumed, err := lastEventID(r)
		if err != nil {
			var p *Problem
			if !errors.As(err, &p) || p.Status != http.StatusBadRequest {
				t.Fatalf("header %q, query %q: error %v is not a 400 problem", header, query, err)
			}
			return
		}
		if resumed != (used != "") {
			t.Fatalf("header %q, query %q: resumed %v", header, query, resumed)
		}
		if resumed && (len(used) > 20 || strconv.FormatUint(n, 10) != trimZeros(used)) {
			t.Fatalf("%q read as seq %d", used, n)
		}
		// The id the server writes on each event reads back as its seq.
		r = getRequest("", http.Header{"Last-Event-Id": {strconv.FormatUint(n, 10)}})
		if again, ok, err := lastEventID(r); err != nil || !ok || again != n {
			t.Fatalf("id %d read back as %d %v %v", n, again, ok, err)
		}
	})
}

// FuzzWantsHTML: the Accept header that picks the HTML job page over the JSON document.
func FuzzWantsHTML(f *testing.F) {
	for _, seed := range []string{
		"text/html", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "application/json",
		"*/*", "text/html;q=0.5, application/json;q=0.4", "text/html;q=2", "text/html;q=-1", "text/html;q=NaN",
		`text/html;q="1"`, "TEXT/HTML", "text/html;;", "", ",,,", "text/html;q=0",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, accept string) {
		html := wantsHTML(accept)
		if html && !strings.Contains(strings.ToLower(accept), "html") {
			t.Fatalf("%q: HTML for an Accept header that does not name it", accept)
		}
		// JSON at q=1 ties with the best HTML can have, and ties go to JSON.
		if wantsHTML(accept + ", application/json") {
			t.Fatalf("%q plus application/json still picks HTML", accept)
		}
	})
}

// getRequest is a bare request with a query and headers: only what the parsers read, so the
// fuzzer spends its time on them rather than on net/http's request parsing.
func getRequest(rawQuery string, h http.Header) *http.Request {
	if h == nil {
		h = http.Header{}
	}
	return &http.Request{Method: http.MethodGet, URL: &url.URL{Path: "/_jobs/x", RawQuery: rawQuery}, Header: h}
}

// trimZeros is a whole number's canonical spelling: no leading zeros.
func trimZeros(s string) string {
	if t := strings.TrimLeft(s, "0"); t != "" {
		return t
	}
	return "0"
}
