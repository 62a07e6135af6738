package child

import (
	"bufio"
	"bytes"
	"strings"
	"sync"
)

// Output collects a child's output for the harness to read while the child runs.
type Output struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *Output) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// FirstLine returns the first complete line, trimmed, once there is one.
func (b *Output) FirstLine() (string, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	line, err := bufio.NewReader(bytes.NewReader(b.buf.Bytes())).ReadString('\n')
	if err != nil {
		return "", false
	}
	return strings.TrimSpace(line), true
}

// Bytes returns a copy of everything written so far.
func (b *Output) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Clone(b.buf.Bytes())
}
