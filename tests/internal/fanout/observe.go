package fanout

import (
	"fmt"
	"slices"
	"time"
)

// ObserveRatio compares, for one shape and protocol, Caddy with tracing and metrics on
// (target caddy-on) to Caddy with them off (caddy-off), measured in the same run: issue #5's
// target is on÷off within 5% for callback-to-delivery latency.
type ObserveRatio struct {
	Shape, Proto        string
	Rounds              int             // pairs measured (the shorter of the two series)
	OffP50, OnP50       []time.Duration // per round, in run order
	OffP99, OnP99       []time.Duration
	MedOffP50, MedOnP50 time.Duration
	MedOffP99, MedOnP99 time.Duration
	RatioP50, RatioP99  float64 // median on ÷ median off
	// Reports sent per second in the window: below the offered rate, the target was saturated
	// (every callback waits for its 204), and the latencies measure its queue.
	Offered               float64
	OffRate, OnRate       []float64
	MedOffRate, MedOnRate float64
	RatioRate             float64
	Delivered, Expected   int64 // over every caddy-off and caddy-on measurement
	OnExports             int64 // span exports received over the caddy-on measurements
	OffErrors, OnErrors   int64
}

// ObserveRatios pairs the caddy-off and caddy-on measurements of the last Main.
func ObserveRatios() []ObserveRatio { return observeRatios(lastResults) }

func observeRatios(all []*result) []ObserveRatio {
	type key struct{ shape, proto string }
	var order []key
	byKey := map[key]*ObserveRatio{}
	for _, r := range all {
		base, proto := r.target, "h2"
		if n := len(base); n > 3 && base[n-3:] == "/h3" {
			base, proto = base[:n-3], "h3"
		}
		if base != "caddy-off" && base != "caddy-on" {
			continue
		}
		k := key{r.shape.String(), proto}
		o := byKey[k]
		if o == nil {
			o = &ObserveRatio{Shape: k.shape, Proto: proto, Offered: r.shape.reportsPerSec()}
			byKey[k] = o
			order = append(order, k)
		}
		o.Delivered += int64(len(r.lat))
		o.Expected += r.sent * int64(r.shape.watchers)
		errs := r.cbErrors + r.subErrors + r.unmatched
		if base == "caddy-off" {
			o.OffP50 = append(o.OffP50, time.Duration(pct(r.lat, .5)))
			o.OffP99 = append(o.OffP99, time.Duration(pct(r.lat, .99)))
			o.OffErrors += errs
			o.OffRate = append(o.OffRate, float64(r.sent)/r.window.Seconds())
		} else {
			o.OnP50 = append(o.OnP50, time.Duration(pct(r.lat, .5)))
			o.OnP99 = append(o.OnP99, time.Duration(pct(r.lat, .99)))
			o.OnErrors += errs
			o.OnExports += r.otlpExports
			o.OnRate = append(o.OnRate, float64(r.sent)/r.window.Seconds())
		}
	}
	var out []ObserveRatio
	for _, k := range order {
		o := byKey[k]
		o.Rounds = min(len(o.OffP50), len(o.OnP50))
		if o.Rounds == 0 {
			continue
		}
		o.MedOffP50, o.MedOnP50 = median(o.OffP50), median(o.OnP50)
		o.MedOffP99, o.MedOnP99 = median(o.OffP99), median(o.OnP99)
		o.RatioP50 = float64(o.MedOnP50) / float64(o.MedOffP50)
		o.RatioP99 = float64(o.MedOnP99) / float64(o.MedOffP99)
		o.MedOffRate, o.MedOnRate = median(o.OffRate), median(o.OnRate)
		o.RatioRate = o.MedOnRate / o.MedOffRate
		out = append(out, *o)
	}
	return out
}

// median is the middle value (the mean of the middle two for an even count).
func median[T time.Duration | float64](xs []T) T {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// printObserveRatios prints the on÷off latency ratios, when both were measured.
func printObserveRatios(all []*result) {
	for _, o := range observeRatios(all) {
		fmt.Fprintf(Out, "\n# observability overhead, %s over %s (%d rounds each): callback→event p50 off %s on %s ms (on÷off %s); p99 off %s on %s ms (on÷off %s); %d span exports received\n",
			o.Shape, o.Proto, o.Rounds, ms(int64(o.MedOffP50)), ms(int64(o.MedOnP50)), ratio3(o.RatioP50),
			ms(int64(o.MedOffP99)), ms(int64(o.MedOnP99)), ratio3(o.RatioP99), o.OnExports)
		fmt.Fprintf(Out, "# reports sent per second (offered %s): off %s, on %s (on÷off %s)\n", fmtF(o.Offered), fmtF(o.MedOffRate), fmtF(o.MedOnRate), ratio3(o.RatioRate))
	}
}

// ratio3 formats a ratio with 3 decimals, truncated.
func ratio3(x float64) string { return fmt.Sprintf("%.3f", float64(int64(x*1000))/1000) }
