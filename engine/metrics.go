package engine

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-progress/progress/store"
)

// Metrics are the Prometheus metrics of jobs, their subscribers and the store, all named
// caddy_progress_*. One set serves the whole process: Caddy makes a new registry for every
// config it loads, so the same collectors are registered into each (see Collectors) and their
// counts go on across reloads. A nil *Metrics records nothing, at the cost of a nil check.
type Metrics struct {
	jobsCreated       *prometheus.CounterVec
	jobsFinished      *prometheus.CounterVec
	jobsQueued        *prometheus.GaugeVec
	jobsRunning       *prometheus.GaugeVec
	queueWait         *prometheus.HistogramVec
	jobDuration       *prometheus.HistogramVec
	progressEvents    *prometheus.CounterVec
	callbacksRejected *prometheus.CounterVec
	subscribers       *prometheus.GaugeVec
	delivery          *prometheus.HistogramVec
	storeCommit       prometheus.Histogram
	storeWrites       prometheus.Counter

	// finishedBy caches the series of jobsFinished and jobDuration per route and state: a
	// label lookup hashes every value, on every job.
	finishedBy sync.Map // finishedKey → finishedSeries
}

type finishedKey struct{ route, state string }

type finishedSeries struct {
	count    prometheus.Counter
	duration prometheus.Observer
}

const metricsNamespace = "caddy_progress"

// Bucket bounds, in seconds. Jobs run from milliseconds to hours; deliveries and commits take
// from well under a millisecond (the targets are 1-5 ms) to seconds on a struggling disk.
var (
	jobBuckets      = []float64{0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600}
	deliveryBuckets = []float64{0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}
)

// How a request became a job: the label values of caddy_progress_jobs_created_total.
const (
	HowRespondAsync = "respond-async" // Prefer: respond-async
	HowWait         = "wait"          // Prefer: wait=N
	HowAlways       = "always"        // the route's async always
	HowAfter        = "after"         // the route's async after <duration>
)

// Kinds of subscriber: the label values of caddy_progress_subscribers and
// caddy_progress_delivery_seconds.
const (
	SubscriberSSE      = "sse"
	SubscriberLongPoll = "longpoll"
)

// Sources of progress events: the label values of caddy_progress_progress_events_total.
const (
	SourceCallback = "callback"
	SourceEstimate = "estimate"
)

// Reasons a callback is refused: the label values of caddy_progress_callbacks_rejected_total.
const (
	RejectMethod    = "method"
	RejectToken     = "bad_token"
	RejectMalformed = "malformed"
	RejectTooLarge  = "too_large"
	RejectFinished  = "finished"
	RejectNotFound  = "not_found" // deleted or expired
	RejectStore     = "store_unavailable"
)

// NewMetrics makes the metrics; register Collectors with a registry to expose them.
func NewMetrics() *Metrics {
	ns := metricsNamespace
	return &Metrics{
		jobsCreated: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "jobs_created_total",
			Help: "Jobs created, by route and by what made the request a job (respond-async, wait, always, after)."},
			[]string{"route", "how"}),
		jobsFinished: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "jobs_finished_total",
			Help: "Jobs ended, by route and final state (succeeded, failed, canceled)."},
			[]string{"route", "state"}),
		jobsQueued: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "jobs_queued",
			Help: "Jobs of this instance waiting for a slot at the upstream (route concurrency)."},
			[]string{"route"}),
		jobsRunning: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "jobs_running",
			Help: "Jobs of this instance whose upstream request is in flight."},
			[]string{"route"}),
		queueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: "queue_wait_seconds",
			Help: "Time from a job's creation to the start of its upstream request (0 when it did not queue).", Buckets: jobBuckets},
			[]string{"route"}),
		jobDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: "job_duration_seconds",
			Help: "Time from a job's creation to its end, by final state.", Buckets: jobBuckets},
			[]string{"route", "state"}),
		progressEvents: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "progress_events_total",
			Help: "Progress updates written to jobs: upstream callbacks (callback) and estimated progress (estimate)."},
			[]string{"source"}),
		callbacksRejected: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "callbacks_rejected_total",
			Help: "Upstream progress callbacks refused, by reason (bad_token, malformed, too_large, finished, not_found, method, store_unavailable)."},
			[]string{"reason"}),
		subscribers: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "subscribers",
			Help: "Clients following a job right now: SSE streams (sse) and long-polls waiting for a change (longpoll)."},
			[]string{"kind"}),
		delivery: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: "delivery_seconds",
			Help: "Time from the moment the store took a job's change (a callback, an estimate, a state change) to the moment its event was written to a subscriber.", Buckets: deliveryBuckets},
			[]string{"kind"}),
		storeCommit: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "store_commit_seconds",
			Help: "Duration of one store commit (a transaction and its fsyncs), which many writes share.", Buckets: deliveryBuckets}),
		storeWrites: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "store_writes_total",
			Help: "Writes committed to the store; divided by the commit count, the writes per commit."}),
	}
}

// Collectors lists the metrics for registration.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.jobsCreated, m.jobsFinished, m.jobsQueued, m.jobsRunning, m.queueWait,
		m.jobDuration, m.progressEvents, m.callbacksRejected, m.subscribers, m.delivery, m.storeCommit, m.storeWrites}
}

// ObserveCommit records one store commit (see store.Options.ObserveCommit).
func (m *Metrics) ObserveCommit(took time.Duration, writes int) {
	if m == nil {
		return
	}
	m.storeCommit.Observe(took.Seconds())
	m.storeWrites.Add(float64(writes))
}

// routeMetrics are a route's metrics with the route label resolved once, so a job does not pay
// a label lookup per observation.
type routeMetrics struct {
	all       *Metrics
	queued    prometheus.Gauge
	running   prometheus.Gauge
	queueWait prometheus.Observer
	created   map[string]prometheus.Counter // by how
}

func (m *Metrics) forRoute(route string) *routeMetrics {
	if m == nil {
		return nil
	}
	rm := &routeMetrics{
		all:       m,
		queued:    m.jobsQueued.WithLabelValues(route),
		running:   m.jobsRunning.WithLabelValues(route),
		queueWait: m.queueWait.WithLabelValues(route),
		created:   make(map[string]prometheus.Counter, 4),
	}
	for _, how := range [...]string{HowRespondAsync, HowWait, HowAlways, HowAfter} {
		rm.created[how] = m.jobsCreated.WithLabelValues(route, how)
	}
	return rm
}

// jobCreated counts a new job, queued or already running.
func (rm *routeMetrics) jobCreated(how string, running bool) {
	if rm == nil {
		return
	}
	rm.created[how].Inc()
	if running {
		rm.running.Inc()
		rm.queueWait.Observe(0)
	} else {
		rm.queued.Inc()
	}
}

// jobStarted moves a queued job to running.
func (rm *routeMetrics) jobStarted(waited time.Duration) {
	if rm == nil {
		return
	}
	rm.queued.Dec()
	rm.running.Inc()
	rm.queueWait.Observe(waited.Seconds())
}

// jobLeft takes a job off the queued or running gauge when its goroutine ends.
func (rm *routeMetrics) jobLeft(running bool) {
	if rm == nil {
		return
	}
	if running {
		rm.running.Dec()
	} else {
		rm.queued.Dec()
	}
}

// jobFinished counts a job's end, from the document the store returned.
func (m *Metrics) jobFinished(doc *store.Job) {
	if m == nil || doc == nil {
		return
	}
	key := finishedKey{doc.Route, string(doc.State)}
	v, ok := m.finishedBy.Load(key)
	if !ok {
		v, _ = m.finishedBy.LoadOrStore(key, finishedSeries{
			count:    m.jobsFinished.WithLabelValues(key.route, key.state),
			duration: m.jobDuration.WithLabelValues(key.route, key.state),
		})
	}
	series := v.(finishedSeries)
	series.count.Inc()
	if doc.FinishedAt != nil {
		series.duration.Observe(doc.FinishedAt.Sub(doc.CreatedAt).Seconds())
	}
}

func (m *Metrics) progressEvent(source string) {
	if m != nil {
		m.progressEvents.WithLabelValues(source).Inc()
	}
}

func (m *Metrics) callbackRejected(reason string) {
	if m != nil {
		m.callbacksRejected.WithLabelValues(reason).Inc()
	}
}

// subscribed counts a subscriber in; call the function it returns when it leaves.
func (m *Metrics) subscribed(kind string) func() {
	if m == nil {
		return func() {}
	}
	g := m.subscribers.WithLabelValues(kind)
	g.Inc()
	return g.Dec
}

// delivered records how long a live event took from the store to a subscriber.
func (m *Metrics) delivered(kind string, ev store.Event) {
	if m == nil || ev.At.IsZero() {
		return
	}
	m.delivery.WithLabelValues(kind).Observe(time.Since(ev.At).Seconds())
}
