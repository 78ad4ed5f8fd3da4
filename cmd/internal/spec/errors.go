package spec

import (
	"errors"
	"fmt"
	"strings"
)

// ErrInvalid matches (errors.Is) every error this package returns for a
// file or service that is not valid; the details are *FieldError values,
// joined with errors.Join when there are several.
var ErrInvalid = errors.New("invalid service spec")

// FieldError is one problem with one field.
type FieldError struct {
	// Path is the field's full path, e.g. services[0].backends[1].state;
	// empty for a problem with the file as a whole.
	Path string
	// Line is the field's line in the YAML, or 0 when not known (a service
	// built in Go).
	Line int
	// Source names the file, when known.
	Source string
	// Msg says what is wrong, e.g. `"actve" is not one of active, drain, disabled`.
	Msg string
}

func (e *FieldError) Error() string {
	var b strings.Builder
	if e.Path != "" {
		b.WriteString(e.Path)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	switch {
	case e.Line > 0 && e.Source != "":
		fmt.Fprintf(&b, " (%s line %d)", e.Source, e.Line)
	case e.Line > 0:
		fmt.Fprintf(&b, " (line %d)", e.Line)
	case e.Source != "":
		fmt.Fprintf(&b, " (%s)", e.Source)
	}
	return b.String()
}

// Unwrap makes every FieldError match ErrInvalid.
func (e *FieldError) Unwrap() error { return ErrInvalid }

// FieldErrors returns the *FieldError values in err (one, or several joined).
func FieldErrors(err error) []*FieldError {
	var out []*FieldError
	var walk func(error)
	walk = func(err error) {
		if fe, ok := err.(*FieldError); ok {
			out = append(out, fe)
			return
		}
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			for _, e := range j.Unwrap() {
				walk(e)
			}
			return
		}
		if u := errors.Unwrap(err); u != nil {
			walk(u)
		}
	}
	walk(err)
	return out
}

// withSource sets Source on every FieldError in err.
func withSource(err error, source string) error {
	for _, fe := range FieldErrors(err) {
		if fe.Source == "" {
			fe.Source = source
		}
	}
	return err
}
