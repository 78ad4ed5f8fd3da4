package health

import "github.com/ikelb/ikelb/dataplane"

// machine is the rise/fall state machine of one target. It is owned by the
// target's goroutine and is not safe for concurrent use.
type machine struct {
	rise, fall int

	health    dataplane.Health
	successes int // consecutive, since the last failure
	failures  int // consecutive, since the last success
}

func newMachine(rise, fall int) machine {
	return machine{rise: rise, fall: fall, health: dataplane.HealthUnknown}
}

// observe records one probe result and returns the previous and new health
// and whether they differ.
func (m *machine) observe(ok bool) (from, to dataplane.Health, changed bool) {
	from = m.health
	if ok {
		m.successes++
		m.failures = 0
		if m.health != dataplane.HealthUp && m.successes >= m.rise {
			m.health = dataplane.HealthUp
		}
	} else {
		m.failures++
		m.successes = 0
		if m.health != dataplane.HealthDown && m.failures >= m.fall {
			m.health = dataplane.HealthDown
		}
	}
	return from, m.health, from != m.health
}
