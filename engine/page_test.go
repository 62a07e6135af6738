package engine

import (
	"net/http"
	"strings"
	"testing"
)

func TestWantsHTML(t *testing.T) {
	for accept, want := range map[string]bool{
		"": false,
		"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8": true, // a browser
		"*/*":                                 false,
		"application/json":                    false,
		"text/html":                           true,
		"application/json, text/html":         false, // a tie goes to JSON
		"text/html;q=0.5, application/json":   false,
		"text/html, application/json;q=0.5":   true,
		"text/html;q=0":                       false,
		"text/event-stream":                   false,
		"text/html;q=nonsense":                true,
		"garbage;;, text/html":                true,
		"application/*;q=0.9, text/html;q=.8": false,
	} {
		if got := wantsHTML(accept); got != want {
			t.Errorf("wantsHTML(%q) = %v, want %v", accept, got, want)
		}
	}
}

func TestJobPage(t *testing.T) {
	f := newFixture(t, Route{})
	id, release := f.startHeld(t)
	defer close(release)
	evil := `</script><img src=x onerror=alert(1)>"'`
	if w := f.report(t, id, f.engine.Token(id), `{"percent": 42.5, "stage": "render", "message": "`+strings.ReplaceAll(evil, `"`, `\"`)+`"}`); w.Code != http.StatusNoContent {
		t.Fatalf("report: %d %s", w.Code, w.Body)
	}
	w := f.call(t, "GET", "/_jobs/"+id, http.Header{"Accept": {"text/html,application/xhtml+xml,*/*;q=0.8"}})
	if w.Code != http.StatusOK || !strings.HasPrefix(w.Header().Get("Content-Type"), "text/html") {
		t.Fatalf("%d %q", w.Code, w.Header().Get("Content-Type"))
	}
	page := w.Body.String()
	csp := w.Header().Get("Content-Security-Policy")
	if !strings.Contains(csp, "default-src 'none'") || !strings.Contains(csp, "script-src 'nonce-") {
		t.Fatalf("CSP %q", csp)
	}
	nonce := strings.TrimSuffix(strings.SplitN(strings.SplitN(csp, "'nonce-", 2)[1], "'", 2)[0], "'")
	if strings.Count(page, `nonce="`+nonce+`"`) != 2 {
		t.Fatalf("the page's script and style do not both carry the CSP nonce %q", nonce)
	}
	for _, want := range []string{id, "42.5%", "render", "/_jobs/" + id + "/events", "EventSource", "aria-valuenow=\"42.5\""} {
		if !strings.Contains(page, want) {
			t.Errorf("page lacks %q", want)
		}
	}
	if strings.Contains(page, "<img") || strings.Contains(page, "</script><") || strings.Count(page, "</script>") != 1 {
		t.Fatalf("the message escaped into markup:\n%s", page)
	}
	if strings.Contains(page, "http://") || strings.Contains(page, "https://") {
		t.Errorf("the page refers to an external resource")
	}
	if w.Header().Get("Vary") != "Accept" {
		t.Errorf("Vary %q", w.Header().Get("Vary"))
	}
	// A program asking for anything gets the JSON document, also with Vary.
	j := f.call(t, "GET", "/_jobs/"+id, http.Header{"Accept": {"*/*"}})
	if j.Header().Get("Content-Type") != "application/json" || j.Header().Get("Vary") != "Accept" {
		t.Fatalf("*/*: %q Vary %q", j.Header().Get("Content-Type"), j.Header().Get("Vary"))
	}
}
