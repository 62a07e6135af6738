package upstreamhook

import "testing"

// BenchmarkSignerCheck times Check on a right token and on wrong ones differing in the first
// or the last character. Check compares with hmac.Equal, so the three should cost the same;
// this is a figure to record (RELIABILITY.md, Security), not an assertion: timings on a
// shared machine are too noisy to fail a test on.
func BenchmarkSignerCheck(b *testing.B) {
	s := NewSigner([]byte("a secret of at least thirty-two bytes"))
	const id = "AZq3x0Jk2m9v0fQwErTyUiOpAsDfGhJk"
	tok := s.Token(id)
	flip := func(c byte) string {
		if c == 'A' {
			return "B"
		}
		return "A"
	}
	for _, tc := range []struct{ name, token string }{
		{"right", tok},
		{"wrong-first", flip(tok[0]) + tok[1:]},
		{"wrong-last", tok[:len(tok)-1] + flip(tok[len(tok)-1])},
	} {
		want := tc.name == "right"
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				if s.Check(id, tc.token) != want {
					b.Fatal("Check answered wrong")
				}
			}
		})
	}
}
