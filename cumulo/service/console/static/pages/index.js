// Every page of the console: the nav lists them in this order; `admin` pages show for admin keys only.
// The shell imports `./<module>` lazily; a page whose module is missing shows the error state.
export const PAGES = [
  { id: 'usage', title: 'Usage', module: 'usage.js', admin: false },
  { id: 'requests', title: 'Requests', module: 'requests.js', admin: false },
  { id: 'keys', title: 'Keys', module: 'keys.js', admin: false },
  { id: 'playground', title: 'Playground', module: 'playground.js', admin: false },
  { id: 'finetune', title: 'Fine-tuning', module: 'finetune.js', admin: false },
  { id: 'edge', title: 'Edge', module: 'edge.js', admin: false },
  { id: 'orgs', title: 'Organisations', module: 'orgs.js', admin: true },
  { id: 'nodes', title: 'Nodes', module: 'nodes.js', admin: true },
  { id: 'chips', title: 'Chips', module: 'chips.js', admin: true },
];
