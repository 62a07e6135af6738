// Package samples holds what the latency harnesses (tests/latency, tests/bench) share to turn
// reports and deliveries into latency samples: the report key carried in a job document, and
// exact percentiles.
package samples

import (
	"bytes"
	"math"
)

// MessageKey finds report k in `"message":"k<k>"` of a job document, without decoding the
// whole document (at 100,000 events a second a full json.Unmarshal in the harness would cost
// more CPU than the target under test). -1 when there is none (the first document).
func MessageKey(data []byte) int64 {
	const marker = `"message":"k`
	i := bytes.Index(data, []byte(marker))
	if i < 0 {
		return -1
	}
	var k int64
	n := 0
	for _, c := range data[i+len(marker):] {
		if c < '0' || c > '9' {
			break
		}
		k = k*10 + int64(c-'0')
		n++
	}
	if n == 0 {
		return -1
	}
	return k
}

// Pct is the q-quantile of sorted xs by nearest rank; -1 for none.
func Pct(xs []int64, q float64) int64 {
	if len(xs) == 0 {
		return -1
	}
	i := int(math.Ceil(float64(len(xs))*q)) - 1
	return xs[min(max(i, 0), len(xs)-1)]
}
