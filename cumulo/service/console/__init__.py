"""The web console (issue #16): a browser front-end served by the gateway itself at /console/, its sign-in
sessions, and the console-only JSON it needs (`/console/api/...`). docs/console.md describes it."""
