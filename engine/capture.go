package engine

import (
	"net/http"
	"sync/atomic"

	"github.com/caddy-progress/progress/store"
)

// What the waiting client gets, decided once by whichever comes first: the upstream's
// response head (the response passes through) or the end of the wait (the client gets 202).
const (
	clientWaiting int32 = iota
	clientPassthrough
	clientReleased
)

// capture is the ResponseWriter the upstream handler writes to. It streams the body into the
// store and, when a client is still waiting for the response (Prefer: wait), also straight to
// that client, so a fast response is not buffered.
type capture struct {
	header http.Header
	result store.ResultWriter

	status      int
	wroteHeader bool
	resultErr   error // the store refused the body (too large, disk error)
	size        int64

	client      http.ResponseWriter
	clientState atomic.Int32
	headSent    chan struct{} // closed when the response head went to the client
	clientGone  bool          // a write to the passthrough client failed
	broken      bool          // the upstream failed after the head went out; set before done closes
}

func newCapture(result store.ResultWriter, client http.ResponseWriter) *capture {
	c := &capture{header: make(http.Header), result: result, client: client, headSent: make(chan struct{})}
	if client == nil {
		c.clientState.Store(clientReleased)
	}
	return c
}

// release hands the client back to its handler (to answer 202) unless the response already
// passes through; it reports whether the client is released.
func (c *capture) release() bool {
	return c.clientState.CompareAndSwap(clientWaiting, clientReleased) || c.clientState.Load() == clientReleased
}

func (c *capture) Header() http.Header { return c.header }

func (c *capture) WriteHeader(status int) {
	if c.wroteHeader || status < 200 {
		return // informational responses are not kept
	}
	c.wroteHeader, c.status = true, status
	if c.clientState.CompareAndSwap(clientWaiting, clientPassthrough) {
		h := c.client.Header()
		for k, v := range c.header {
			h[k] = v
		}
		c.client.WriteHeader(status)
		c.flush()
		close(c.headSent)
	}
}

func (c *capture) Write(p []byte) (int, error) {
	if !c.wroteHeader {
		c.WriteHeader(http.StatusOK)
	}
	if c.resultErr == nil {
		if _, err := c.result.Write(p); err != nil {
			c.resultErr = err
		}
	}
	passthrough := c.clientState.Load() == clientPassthrough && !c.clientGone
	if passthrough {
		if _, err := c.client.Write(p); err != nil {
			c.clientGone = true // the client left; the job still runs to its end
		}
	}
	if c.resultErr != nil && !passthrough {
		// Nobody can receive the rest: stop the upstream instead of reading it for nothing.
		return 0, c.resultErr
	}
	c.size += int64(len(p))
	return len(p), nil
}

// Flush passes a flush through to a passthrough client (reverse_proxy flushes event streams
// and, with flush_interval, everything).
func (c *capture) Flush() { c.flush() }

func (c *capture) FlushError() error {
	c.flush()
	return nil
}

func (c *capture) flush() {
	if c.clientState.Load() == clientPassthrough && !c.clientGone {
		if err := http.NewResponseController(c.client).Flush(); err != nil {
			c.clientGone = true
		}
	}
}
