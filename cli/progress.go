package cli

import (
	"fmt"
	"io"
	"sync"
	"time"
)

// progress draws a one-line status on a terminal, at most every 200 ms.
// On anything else it stays silent; commands print a summary line instead.
type progress struct {
	w    io.Writer
	on   bool
	mu   sync.Mutex
	last time.Time
	wide int
}

func newProgress(w io.Writer) *progress { return &progress{w: w, on: isTTY(w)} }

func (p *progress) update(format string, args ...any) {
	if !p.on {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if time.Since(p.last) < 200*time.Millisecond {
		return
	}
	p.last = time.Now()
	p.draw(fmt.Sprintf(format, args...))
}

func (p *progress) draw(s string) {
	pad := ""
	if n := p.wide - len(s); n > 0 {
		pad = fmt.Sprintf("%*s", n, "")
	}
	p.wide = len(s)
	fmt.Fprintf(p.w, "\r%s%s", s, pad)
}

// done clears the line.
func (p *progress) done() {
	if !p.on {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.wide > 0 {
		p.draw("")
		fmt.Fprint(p.w, "\r")
	}
}

func bar(done, total int64, width int) string {
	if total <= 0 {
		total = 1
	}
	n := int(done * int64(width) / total)
	if n > width {
		n = width
	}
	b := make([]byte, width)
	for i := range b {
		if i < n {
			b[i] = '#'
		} else {
			b[i] = '.'
		}
	}
	return "[" + string(b) + "]"
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
