// Package vmharness is the module root; the code lives in harness/, runner/,
// journalremote/, sshproxy/ and images/.
package vmharness
