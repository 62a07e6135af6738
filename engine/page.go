package engine

import (
	"bytes"
	"crypto/rand"
	_ "embed"
	"encoding/base64"
	"html/template"
	"math"
	"mime"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddy-progress/progress/store"
)

// wantsHTML reports whether a request's Accept header prefers text/html to application/json,
// as a browser's address bar does. Ties, */* and no Accept header go to JSON: programs that
// say nothing get the document.
func wantsHTML(accept string) bool {
	if accept == "" {
		return false
	}
	html, jsonQ := -1.0, -1.0
	for _, part := range strings.Split(accept, ",") {
		mediaType, params, err := mime.ParseMediaType(strings.TrimSpace(part))
		if err != nil {
			continue
		}
		q := 1.0
		if v, ok := params["q"]; ok {
			if f, err := strconv.ParseFloat(v, 64); err == nil && f >= 0 && f <= 1 {
				q = f
			}
		}
		switch mediaType {
		case "text/html":
			html = math.Max(html, q)
		case "application/json":
			jsonQ = math.Max(jsonQ, q)
		case "*/*", "application/*":
			jsonQ = math.Max(jsonQ, q)
		}
	}
	return html > 0 && html > jsonQ
}

//go:embed page.html
var pageSource string

var pageTemplate = template.Must(template.New("job").Funcs(template.FuncMap{
	"percent": func(p *store.Progress) string {
		if p == nil || p.Percent == nil {
			return ""
		}
		return strconv.FormatFloat(*p.Percent, 'f', -1, 64)
	},
}).Parse(pageSource))

// pageData is what the job page template sees.
type pageData struct {
	Job   *store.Job
	Nonce string // lets the page's own script and style run under the CSP
}

// page serves the human view of a job: a self-contained page that follows the job's event
// stream and shows a live progress bar, stage, message and ETA, and the result link at the end.
func (a *API) page(w http.ResponseWriter, job *store.Job) error {
	nonceBytes := make([]byte, 16)
	rand.Read(nonceBytes)
	nonce := base64.RawURLEncoding.EncodeToString(nonceBytes) // no + or /, which html/template would escape
	var buf bytes.Buffer
	// html/template writes the job into the script as escaped JSON and into the HTML as
	// escaped text: a message holding "</script>" or markup stays text.
	if err := pageTemplate.Execute(&buf, pageData{Job: job, Nonce: nonce}); err != nil {
		return problem(http.StatusInternalServerError, "internal", "Could not render the job page", err.Error())
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("Vary", "Accept")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	// No external assets, and nothing but the page's own script, style and same-origin
	// event stream may run or load.
	h.Set("Content-Security-Policy", "default-src 'none'; script-src 'nonce-"+nonce+"'; style-src 'nonce-"+nonce+"'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
	h.Set("Content-Length", strconv.Itoa(buf.Len()))
	w.WriteHeader(http.StatusOK)
	w.Write(buf.Bytes())
	return nil
}
