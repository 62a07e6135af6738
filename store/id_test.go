package store

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"math"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// recordingReader hands out bytes from r and keeps a copy of every byte it handed out.
type recordingReader struct {
	r    io.Reader
	read []byte
}

func (rr *recordingReader) Read(p []byte) (int, error) {
	n, err := rr.r.Read(p)
	rr.read = append(rr.read, p[:n]...)
	return n, err
}

// TestIDRandomPartComesFromCryptoRand: the 144 random bits of a job id are exactly the bytes
// crypto/rand hands out (DESIGN.md: at least 128 random bits from crypto/rand), read for
// nothing else, and the time prefix is the creation time. crypto/rand.Read draws from
// rand.Reader, so a recording Reader in its place sees what newID took.
func TestIDRandomPartComesFromCryptoRand(t *testing.T) {
	rec := &recordingReader{r: rand.Reader}
	saved := rand.Reader
	rand.Reader = rec
	t.Cleanup(func() { rand.Reader = saved })

	now := time.UnixMilli(1_700_000_000_123)
	raw, text := newID(now)
	rand.Reader = saved
	if len(rec.read) != idRandLen || idRandLen*8 < 128 {
		t.Fatalf("newID read %d bytes from crypto/rand, want %d (at least 128 bits)", len(rec.read), idRandLen)
	}
	if !bytes.Equal(raw[idTimeLen:], rec.read) {
		t.Fatalf("random part %x is not what crypto/rand gave, %x", raw[idTimeLen:], rec.read)
	}
	var ms uint64
	for _, b := range raw[:idTimeLen] {
		ms = ms<<8 | uint64(b)
	}
	if ms != uint64(now.UnixMilli()) {
		t.Fatalf("time prefix %d, want %d", ms, now.UnixMilli())
	}
	if back, ok := parseID(text); !ok || back != raw {
		t.Fatalf("id %q does not parse back to its bytes", text)
	}
}

// TestIDsAreUniqueURLSafeAndBalanced makes many ids at the same millisecond, so that only the
// random part tells them apart: none repeats, each is 32 URL-safe characters that parse back,
// and every one of the 144 random bit positions is set in about half of them. The bound, 6
// standard deviations, is loose enough never to fail by chance (p < 1e-8 per position) and
// tight enough to catch a stuck, constant or mostly-zero byte.
func TestIDsAreUniqueURLSafeAndBalanced(t *testing.T) {
	const n = 20000
	now := time.Now()
	seen := make(map[rawID]bool, n)
	var ones [idRandLen * 8]int
	for range n {
		raw, text := newID(now)
		if seen[raw] {
			t.Fatalf("id %s made twice", text)
		}
		seen[raw] = true
		if len(text) != idTextLen || strings.Trim(text, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") != "" {
			t.Fatalf("id %q is not %d base64url characters", text, idTextLen)
		}
		if back, ok := parseID(text); !ok || back != raw {
			t.Fatalf("id %q does not parse back", text)
		}
		for i, b := range raw[idTimeLen:] {
			for bit := range 8 {
				ones[i*8+bit] += int(b >> bit & 1)
			}
		}
	}
	sigma := math.Sqrt(n) / 2
	worst := 0.0
	for pos, c := range ones {
		dev := math.Abs(float64(c) - n/2)
		worst = max(worst, dev/sigma)
		if dev > 6*sigma {
			t.Errorf("random bit %d set in %d of %d ids, want about %d (±%.0f)", pos, c, n, n/2, 6*sigma)
		}
	}
	t.Logf("%d ids at one millisecond: no repeat; largest bit imbalance %.2f standard deviations", n, worst)
}

// TestCreateUsesNewID: ids the store hands out through Create have the same shape, and jobs
// created in the same millisecond differ.
func TestCreateUsesNewID(t *testing.T) {
	st, err := Open(filepath.Join(t.TempDir(), "p.db"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ids := make(map[string]bool)
	for range 50 {
		job, _, err := st.Create(context.Background(), NewJob{Request: RequestInfo{Method: "GET", URI: "/x"}})
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := parseID(job.ID); !ok || ids[job.ID] {
			t.Fatalf("Create gave id %q (seen before: %v)", job.ID, ids[job.ID])
		}
		ids[job.ID] = true
	}
}
