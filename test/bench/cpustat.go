package bench

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// cpuBusy returns how long CPU cpu (a number, as in taskset -c) has been
// busy since boot: every /proc/stat field but idle and iowait. /proc/stat
// is the host's whatever the namespace, so it sees the balancer's CPU
// whether the time goes to its process or to the kernel's packet work.
func cpuBusy(cpu string) (time.Duration, error) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	name := "cpu" + cpu
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || fields[0] != name {
			continue
		}
		var busy uint64
		for i, v := range fields[1:] {
			if i == 3 || i == 4 { // idle, iowait
				continue
			}
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("bench: /proc/stat %s: %w", name, err)
			}
			busy += n
		}
		// USER_HZ is 100 on every Linux architecture Go supports here.
		return time.Duration(busy) * 10 * time.Millisecond, nil
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("bench: no %s in /proc/stat", name)
}
