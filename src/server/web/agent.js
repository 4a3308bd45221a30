// The Tallyworks agent console. Plain JavaScript, no dependencies, no external requests: it calls
// the agent routes of the Helpline API with the key the agent enters (kept in sessionStorage, so
// it dies with the tab). Every string the server sends (customer messages, bot answers, drafts,
// summaries) is put into the page as text nodes, never parsed as markup.
'use strict';

(() => {
  const KEY_STORAGE = 'helpline.agentKey';
  const REFRESH_MS = 10000;
  const PAGE_SIZE = 50;

  const $ = (id) => document.getElementById(id);
  const ui = {
    actionForm: $('action-form'),
    actionName: $('action-name'),
    actionArgs: $('action-args'),
    actionConfirm: $('action-confirm'),
    actionRun: $('action-run'),
    actionResult: $('action-result'),
    keyForm: $('key-form'),
    keyInput: $('agent-key'),
    keyState: $('key-state'),
    forgetKey: $('forget-key'),
    status: $('status'),
    error: $('error'),
    errorText: $('error-text'),
    errorRetry: $('error-retry'),
    errorDismiss: $('error-dismiss'),
    filter: $('queue-filter'),
    queue: $('queue'),
    queueEmpty: $('queue-empty'),
    queueMore: $('queue-more'),
    queueRefresh: $('queue-refresh'),
    drafts: $('drafts'),
    draftsEmpty: $('drafts-empty'),
    draftsRefresh: $('drafts-refresh'),
    conversation: $('conversation'),
    placeholder: $('placeholder'),
    convTitle: $('conv-title'),
    convMeta: $('conv-meta'),
    handoff: $('handoff'),
    handoffBody: $('handoff-body'),
    turns: $('turns'),
    summary: $('summary'),
    summaryBody: $('summary-body'),
    kbResult: $('kb-result'),
    kbResultBody: $('kb-result-body'),
    takeover: $('takeover'),
    summarize: $('summarize'),
    kbDraft: $('kb-draft'),
    resolve: $('resolve'),
    replyForm: $('reply-form'),
    note: $('draft-note'),
    draft: $('draft'),
    restore: $('restore'),
    reply: $('reply'),
    draftExtra: $('draft-extra'),
    send: $('send'),
  };

  /** The open conversation: {id, conversation, turns}; null when none is open. */
  let current = null;
  /** Unsent reply text per conversation id, so switching conversations loses nothing. */
  const unsent = new Map();
  /** The agent's own text that a draft replaced (offered back by "Restore my text"). */
  let replaced = null;
  /** Where the queue's next page starts (null: no more pages). */
  let nextCursor = null;
  /** Labels of the requests in flight; a button does nothing while its request runs. */
  const inFlight = new Set();
  /** The action refused for want of a valid key, {label, run}; it runs again once a key is entered. */
  let awaitingKey = null;
  /** The label of the action whose failure is on screen (its next success clears it). */
  let errorOwner = null;
  let timer = null;

  class ApiFailure extends Error {
    /** `sentKey`: whether the refused request carried a key (a wrong key, not a missing one). */
    constructor(status, message, sentKey = true) {
      super(message);
      this.status = status;
      this.sentKey = sentKey;
    }
  }

  // ---- DOM helpers: strings always become text nodes.

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === 'class') node.className = value;
      else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const text = (v) => (v === null || v === undefined ? '' : String(v));
  const list = (v) => (Array.isArray(v) ? v : []);
  const obj = (v) => (v && typeof v === 'object' && !Array.isArray(v) ? v : {});

  /** Only http(s) and same-origin URLs become links; anything else (javascript: …) stays text. */
  function safeHref(url) {
    if (typeof url !== 'string' || url === '') return null;
    try {
      const parsed = new URL(url, location.href);
      return parsed.protocol === 'http:' || parsed.protocol === 'https:' ? url : null;
    } catch {
      return null;
    }
  }

  function when(ms) {
    if (typeof ms !== 'number' || !Number.isFinite(ms)) return null;
    const d = new Date(ms);
    return el('time', { datetime: d.toISOString(), title: d.toLocaleString() }, d.toLocaleString());
  }

  function ago(ms) {
    if (typeof ms !== 'number' || !Number.isFinite(ms)) return '';
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return 'just now';
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function customerLabel(c) {
    const customer = obj(c);
    const parts = [customer.id ? text(customer.id) : 'anonymous'];
    if (customer.account_id) parts.push(`account ${text(customer.account_id)}`);
    if (customer.plan) parts.push(text(customer.plan));
    if (customer.locale) parts.push(text(customer.locale));
    return parts.join(' · ');
  }

  function sentimentOf(conv) {
    const s = obj(obj(obj(obj(conv).handoff).summary).sentiment);
    return typeof s.label === 'string' ? s.label : null;
  }

  const STATUS_NAMES = { open: 'Open', handed_off: 'Handed off', resolved: 'Resolved' };
  const ROLE_NAMES = { customer: 'Customer', bot: 'Assistant', agent: 'Agent' };

  // ---- status, errors and the key

  function say(message) {
    ui.status.textContent = message;
  }

  function showError(label, message, retry) {
    errorOwner = label;
    ui.errorText.textContent = message;
    ui.errorRetry.hidden = !retry;
    ui.errorRetry.onclick = retry
      ? () => {
          hideError();
          retry();
        }
      : null;
    ui.error.hidden = false;
  }

  function hideError() {
    errorOwner = null;
    ui.error.hidden = true;
    ui.errorRetry.onclick = null;
  }

  function key() {
    return sessionStorage.getItem(KEY_STORAGE);
  }

  function showKeyState() {
    const has = key() !== null;
    ui.keyState.textContent = has ? 'Key set for this tab.' : 'No key set. The key stays in this browser tab only.';
    ui.forgetKey.hidden = !has;
  }

  /** One API call: the parsed JSON body, or an ApiFailure with the server's own message. */
  async function api(method, path, body) {
    const k = key();
    if (k === null) throw new ApiFailure(401, 'no agent key is set', false);
    const headers = { Accept: 'application/json', Authorization: `Bearer ${k}` };
    const init = { method, headers, cache: 'no-store' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch {
      throw new ApiFailure(0, 'could not reach the server; check the connection');
    }
    const data = await resp.json().catch(() => null);
    if (!resp.ok) {
      const err = obj(obj(data).error);
      throw new ApiFailure(resp.status, text(err.message) || `${resp.status} ${resp.statusText}`.trim());
    }
    return data;
  }

  /**
   * Runs one labelled action: ignored while the same action is still running, its failure shown
   * with a way to try again (or, for a refused key, run again once a valid key is entered).
   */
  async function perform(label, action, { quiet = false, button = null } = {}) {
    if (inFlight.has(label)) return undefined;
    inFlight.add(label);
    // aria-busy rather than `disabled`: a disabled button would drop keyboard focus.
    if (button) button.setAttribute('aria-busy', 'true');
    if (!quiet) say(`${label}…`);
    const again = () => perform(label, action, { button });
    try {
      const result = await action();
      if (errorOwner === label) hideError();
      return result;
    } catch (err) {
      if (!(err instanceof ApiFailure)) throw err;
      if (err.status === 401 || err.status === 403) {
        keyRefused(label, err, again);
      } else {
        say(`${label} failed.`);
        showError(label, `${label} failed (${err.status || 'no connection'}): ${err.message}. Nothing was lost; you can try again.`, again);
      }
      return undefined;
    } finally {
      inFlight.delete(label);
      if (button) button.removeAttribute('aria-busy');
    }
  }

  function keyRefused(label, err, again) {
    if (err.status === 401) sessionStorage.removeItem(KEY_STORAGE);
    showKeyState();
    stopTimer();
    awaitingKey = { label, run: again };
    const why = err.status === 403 ? 'The server refused the agent routes' : err.sentKey ? 'That agent key was not accepted' : 'An agent key is needed';
    say('Enter a valid agent key.');
    showError(label, `${why} (${err.message}). Enter a valid agent key.`, null);
    // Automatic refreshes must not pull focus away from whatever the agent is doing.
    if (!label.startsWith('Refreshing')) ui.keyInput.focus();
  }

  // ---- the queue

  function queuePath(cursor) {
    const q = new URLSearchParams();
    if (ui.filter.value) q.set('status', ui.filter.value);
    q.set('limit', String(PAGE_SIZE));
    if (cursor) q.set('cursor', cursor);
    return `/v1/conversations?${q}`;
  }

  function queueItem(conv) {
    const c = obj(conv);
    const handoff = c.handoff ? obj(c.handoff) : null;
    const sentiment = sentimentOf(c);
    const since = handoff && typeof handoff.at_ms === 'number' ? handoff.at_ms : c.updated_ms;
    const reason = handoff ? text(handoff.reason) || 'handed off' : STATUS_NAMES[c.status] || text(c.status);
    const button = el(
      'button',
      {
        type: 'button',
        class: 'queue-item',
        'data-testid': 'queue-item',
        'data-id': text(c.id),
        'aria-current': current && current.id === c.id ? 'true' : null,
        onclick: () => openConversation(text(c.id), { focus: true }),
      },
      el('span', { class: 'qi-top' }, el('span', { class: 'qi-reason', 'data-testid': 'queue-reason' }, reason), el('span', { class: 'qi-age' }, ago(since))),
      el('span', { class: 'qi-customer', 'data-testid': 'queue-customer' }, customerLabel(c.customer)),
      el(
        'span',
        { class: 'qi-bottom' },
        el('span', { class: 'qi-id' }, text(c.id)),
        sentiment ? el('span', { class: `sentiment ${sentiment}`, 'data-testid': 'queue-sentiment' }, sentiment) : null,
      ),
    );
    return el('li', {}, button);
  }

  function renderQueue(items, append) {
    // The item with focus keeps it across a refresh (the list is rebuilt).
    const focusedId = document.activeElement && document.activeElement.classList.contains('queue-item') ? document.activeElement.dataset.id : null;
    const nodes = items.map(queueItem);
    if (append) ui.queue.append(...nodes);
    else ui.queue.replaceChildren(...nodes);
    ui.queueEmpty.hidden = ui.queue.children.length > 0;
    ui.queueMore.hidden = !nextCursor;
    if (focusedId !== null) {
      const again = [...ui.queue.querySelectorAll('.queue-item')].find((b) => b.dataset.id === focusedId);
      (again || ui.queue).focus();
    }
  }

  function markCurrentInQueue() {
    for (const b of ui.queue.querySelectorAll('.queue-item')) {
      if (current && b.dataset.id === current.id) b.setAttribute('aria-current', 'true');
      else b.removeAttribute('aria-current');
    }
  }

  function refreshQueue({ quiet = false } = {}) {
    const label = quiet ? 'Refreshing the queue' : 'Loading the queue';
    return perform(
      label,
      async () => {
        const page = obj(await api('GET', queuePath(null)));
        nextCursor = typeof page.next_cursor === 'string' && page.next_cursor ? page.next_cursor : null;
        const items = list(page.data);
        renderQueue(items, false);
        // A failed automatic refresh is cleared by the next good one, whichever label it had.
        if (errorOwner === 'Refreshing the queue' || errorOwner === 'Loading the queue') hideError();
        if (!quiet) say(`${items.length} conversation${items.length === 1 ? '' : 's'} in the queue.`);
      },
      { quiet, button: quiet ? null : ui.queueRefresh },
    );
  }

  function loadMore() {
    if (!nextCursor) return undefined;
    const cursor = nextCursor;
    return perform(
      'Loading more conversations',
      async () => {
        const page = obj(await api('GET', queuePath(cursor)));
        nextCursor = typeof page.next_cursor === 'string' && page.next_cursor ? page.next_cursor : null;
        renderQueue(list(page.data), true);
        say('More conversations loaded.');
      },
      { button: ui.queueMore },
    );
  }

  // ---- one conversation

  function metaRow(term, ...value) {
    return [el('dt', {}, term), el('dd', {}, ...value)];
  }

  function renderMeta(conv) {
    const c = obj(conv);
    const customer = obj(c.customer);
    const rows = [
      metaRow('Status', el('span', { 'data-testid': 'conv-status' }, STATUS_NAMES[c.status] || text(c.status))),
      metaRow('Customer', el('span', { 'data-testid': 'conv-customer' }, customerLabel(customer))),
      metaRow('Started', when(c.created_ms) || '—'),
      metaRow('Updated', when(c.updated_ms) || '—', c.updated_ms ? ` (${ago(c.updated_ms)})` : ''),
    ];
    const attributes = Object.entries(obj(customer.attributes));
    if (attributes.length) {
      const value = attributes.map(([k, v]) => `${k}: ${typeof v === 'string' ? v : JSON.stringify(v)}`).join(', ');
      rows.push(metaRow('Attributes', value));
    }
    const fb = c.feedback ? obj(c.feedback) : null;
    if (fb) rows.push(metaRow('Customer feedback', feedbackText(fb)));
    ui.convMeta.replaceChildren(...rows.flat());
  }

  function feedbackText(fb) {
    const parts = [];
    if (fb.helpful === true) parts.push('helpful');
    if (fb.helpful === false) parts.push('not helpful');
    if (fb.resolved === true) parts.push('resolved');
    if (fb.resolved === false) parts.push('not resolved');
    if (fb.comment) parts.push(`“${text(fb.comment)}”`);
    return parts.join(', ') || 'given';
  }

  function citationLabel(c) {
    const title = text(c.title || c.doc_id) || 'Source';
    return c.section ? `${title} › ${text(c.section)}` : title;
  }

  /** A numbered list of sources, each a link to its passage (opening in a new tab). */
  function sources(citations, testid) {
    const items = list(citations).map((raw, i) => {
      const c = obj(raw);
      const href = safeHref(c.url);
      const label = citationLabel(c);
      const link = href
        ? el('a', { href, target: '_blank', rel: 'noopener', 'data-testid': testid }, label, el('span', { class: 'visually-hidden' }, ' (opens in a new tab)'))
        : el('span', { 'data-testid': testid }, label);
      const index = Number.isInteger(c.index) ? c.index : i + 1;
      return el('li', { value: String(index) }, link, c.snippet ? el('span', { class: 'snippet' }, ` — ${text(c.snippet)}`) : null);
    });
    if (!items.length) return null;
    return el('div', { class: 'sources' }, el('p', { class: 'label' }, 'Sources'), el('ol', {}, items));
  }

  /** What the policy pack did: action, the rules that fired, the reason, what decoding enforced. */
  function guardLine(raw) {
    if (!raw || typeof raw !== 'object') return null;
    const g = obj(raw);
    const action = text(g.action) || 'none';
    const parts = [el('strong', {}, 'Guard: '), el('span', { class: 'guard-action', 'data-testid': 'guard-action' }, action)];
    const rules = list(g.rules).map(text);
    parts.push(' · rules fired: ', el('span', { 'data-testid': 'guard-rules' }, rules.length ? rules.join(', ') : 'none'));
    if (g.reason) parts.push(' · reason: ', el('span', { 'data-testid': 'guard-reason' }, text(g.reason)));
    const enforced = list(g.constrained_by).map(text);
    if (enforced.length) parts.push(` · enforced while decoding: ${enforced.join(', ')}`);
    if (g.policy_version) parts.push(` · policy ${text(g.policy_version)}`);
    return el('p', { class: `guard action-${action}`, 'data-testid': 'guard', 'data-action': action }, ...parts);
  }

  function groundingLine(raw) {
    const g = obj(raw);
    if (!g.status) return null;
    const n = list(g.passages).length;
    return el('p', { class: 'grounding', 'data-testid': 'grounding' }, `Grounding: ${text(g.status)}${n ? ` (${n} passage${n === 1 ? '' : 's'})` : ''}`);
  }

  /** What a turn did about a declared action: name, stage, the call's outcome. */
  function actionLine(raw) {
    if (!raw || typeof raw !== 'object') return null;
    const a = obj(raw);
    const call = a.call ? obj(a.call) : null;
    const parts = [el('strong', {}, 'Action: '), el('span', { 'data-testid': 'action-name' }, text(a.name)), ` (${text(a.effect)}, by ${text(a.detected_by)})`];
    parts.push(' · ', el('span', { 'data-testid': 'action-stage' }, text(a.stage)));
    if (a.reason) parts.push(` · reason: ${text(a.reason)}`);
    if (call) {
      parts.push(` · ${text(call.outcome)}`);
      if (call.status) parts.push(` (HTTP ${text(call.status)})`);
      parts.push(` in ${Math.round(Number(call.latency_ms) || 0)} ms`);
    }
    return el('p', { class: 'guard', 'data-testid': 'turn-action' }, ...parts);
  }

  /** The declared actions (none declared: the form stays hidden). */
  let declared = [];
  function loadActions() {
    return perform(
      'Loading the actions',
      async () => {
        declared = list(obj(await api('GET', '/v1/actions')).actions).map(obj);
        ui.actionName.replaceChildren(...declared.map((a) => el('option', { value: text(a.name) }, `${text(a.name)} (${text(a.effect)})`)));
        ui.actionForm.hidden = declared.length === 0;
      },
      { quiet: true },
    );
  }

  function runAction() {
    if (!requireConversation()) return;
    let args;
    try {
      args = JSON.parse(ui.actionArgs.value || '{}');
      if (!args || typeof args !== 'object' || Array.isArray(args)) throw new Error('not an object');
    } catch {
      say('The arguments must be a JSON object, e.g. {"email": "ap@example.com"}.');
      ui.actionArgs.focus();
      return;
    }
    const id = current.id;
    const name = ui.actionName.value;
    perform(
      'Running the action',
      async () => {
        const r = obj(await api('POST', `/v1/conversations/${encodeURIComponent(id)}/actions/${encodeURIComponent(name)}`, { arguments: args, confirm: ui.actionConfirm.checked }));
        ui.actionResult.textContent = `${text(obj(r.action).stage)}: ${text(r.text)}`;
        ui.actionConfirm.checked = false;
        await openConversation(id, { quiet: true });
      },
      { button: ui.actionRun },
    );
  }

  function turnItem(raw) {
    const t = obj(raw);
    const detail = obj(t.detail);
    const role = text(t.role);
    const state = text(t.state) || 'complete';
    const head = [el('span', { class: 'who' }, ROLE_NAMES[role] || role), ' ', when(t.created_ms)];
    if (state !== 'complete') head.push(' ', el('span', { class: 'badge', 'data-testid': 'turn-state' }, state));
    if (t.finish_reason && t.finish_reason !== 'stop') head.push(' ', el('span', { class: 'badge' }, `finish: ${text(t.finish_reason)}`));
    const fb = t.feedback ? obj(t.feedback) : null;
    return el(
      'li',
      { class: `turn ${role}`, 'data-testid': 'turn', 'data-role': role, 'data-state': state, 'data-id': text(t.id) },
      el('p', { class: 'turn-head' }, ...head),
      el('p', { class: 'text', 'data-testid': 'turn-text' }, text(t.content)),
      sources(detail.citations, 'turn-citation'),
      guardLine(detail.guard),
      actionLine(detail.action),
      groundingLine(detail.grounding),
      fb ? el('p', { class: 'feedback' }, `Feedback: ${feedbackText(fb)}`) : null,
    );
  }

  function renderHandoff(conv) {
    const handoff = obj(conv).handoff ? obj(conv.handoff) : null;
    ui.handoff.hidden = !handoff;
    if (!handoff) {
      ui.handoffBody.replaceChildren();
      return;
    }
    const s = obj(handoff.summary);
    const sentiment = obj(s.sentiment);
    const rows = [
      metaRow('Reason', el('span', { 'data-testid': 'handoff-reason' }, text(handoff.reason) || '—'), handoff.by ? ` (by ${text(handoff.by)})` : ''),
      metaRow('When', when(handoff.at_ms) || '—', handoff.at_ms ? ` (${ago(handoff.at_ms)})` : ''),
      metaRow('Issue', el('span', { class: 'text', 'data-testid': 'handoff-issue' }, text(s.issue) || '—')),
    ];
    if (s.latest_message && s.latest_message !== s.issue) rows.push(metaRow('Latest message', el('span', { class: 'text' }, text(s.latest_message))));
    if (sentiment.label) {
      const cues = list(sentiment.cues).map(text);
      rows.push(
        metaRow(
          'Sentiment',
          el('span', { class: `sentiment ${text(sentiment.label)}`, 'data-testid': 'handoff-sentiment' }, text(sentiment.label)),
          cues.length ? ` (cues: ${cues.join(', ')})` : '',
        ),
      );
    }
    const tried = list(s.tried).map((raw) => {
      const t = obj(raw);
      const cited = list(t.cited).map(text);
      return el(
        'li',
        {},
        el('strong', {}, `${text(t.by) || 'bot'}, ${text(t.outcome) || 'answered'}: `),
        el('span', { class: 'text' }, text(t.answer)),
        cited.length ? ` (cited: ${cited.join(', ')})` : '',
      );
    });
    rows.push(metaRow('Tried', tried.length ? el('ol', { 'data-testid': 'handoff-tried' }, tried) : 'nothing yet'));
    const docs = list(s.docs_cited).map((raw) => {
      const d = obj(raw);
      const id = text(d.doc_id);
      const label = text(d.title) || id;
      return el('li', {}, id ? el('a', { href: `/kb/${encodeURIComponent(id)}`, target: '_blank', rel: 'noopener' }, label) : label);
    });
    rows.push(metaRow('Docs cited', docs.length ? el('ul', { 'data-testid': 'handoff-docs' }, docs) : 'none'));
    ui.handoffBody.replaceChildren(el('dl', { class: 'meta' }, rows.flat()));
  }

  function renderConversation(data) {
    const d = obj(data);
    const conv = obj(d.conversation);
    current = { id: text(conv.id), conversation: conv, turns: list(d.turns) };
    ui.convTitle.textContent = `Conversation ${text(conv.id)}`;
    renderMeta(conv);
    renderHandoff(conv);
    ui.turns.replaceChildren(...current.turns.map(turnItem));
    ui.conversation.hidden = false;
    ui.placeholder.hidden = true;
    markCurrentInQueue();
  }

  /** Opens a conversation (or reloads the open one); assist results of another one are cleared. */
  function openConversation(id, { focus = false, quiet = false } = {}) {
    return perform(
      quiet ? 'Refreshing the conversation' : 'Opening the conversation',
      async () => {
        const data = await api('GET', `/v1/conversations/${encodeURIComponent(id)}`);
        const switching = !current || current.id !== id;
        if (switching) {
          if (current) unsent.set(current.id, ui.reply.value);
          ui.reply.value = unsent.get(id) || '';
          ui.note.value = '';
          replaced = null;
          ui.restore.hidden = true;
          for (const [section, body] of [
            [ui.summary, ui.summaryBody],
            [ui.kbResult, ui.kbResultBody],
            [ui.draftExtra, ui.draftExtra],
          ]) {
            section.hidden = true;
            body.replaceChildren();
          }
        } else if (quiet && obj(obj(data).conversation).updated_ms === current.conversation.updated_ms) {
          return; // nothing changed: leave the page (and the agent's focus) as it is
        }
        renderConversation(data);
        if (!quiet) say(`Conversation ${id} open: ${current.turns.length} turn${current.turns.length === 1 ? '' : 's'}.`);
        if (focus) ui.conversation.focus();
      },
      { quiet },
    );
  }

  function requireConversation() {
    if (current) return true;
    say('Open a conversation from the queue first.');
    return false;
  }

  // ---- actions on the open conversation

  function statusChange(label, path, done) {
    if (!requireConversation()) return undefined;
    const id = current.id;
    const button = label === 'Taking over' ? ui.takeover : ui.resolve;
    return perform(
      label,
      async () => {
        await api('POST', `/v1/conversations/${encodeURIComponent(id)}/${path}`, {});
        say(done(id));
        await Promise.all([openConversation(id, { quiet: true }), refreshQueue({ quiet: true })]);
      },
      { button },
    );
  }

  function draftReply() {
    if (!requireConversation()) return undefined;
    const id = current.id;
    const note = ui.note.value.trim();
    return perform(
      'Drafting a reply',
      async () => {
        const body = { conversation_id: id };
        if (note) body.note = note;
        const d = obj(await api('POST', '/v1/assist/draft', body));
        if (!current || current.id !== id) return; // the agent moved on meanwhile
        const mine = ui.reply.value;
        const draft = text(d.draft);
        if (mine.trim() && mine !== draft) {
          replaced = mine;
          ui.restore.hidden = false;
        }
        ui.reply.value = draft;
        renderDraftExtra(d);
        say('Draft ready: edit it, then Send.');
        ui.reply.focus();
      },
      { button: ui.draft },
    );
  }

  function renderDraftExtra(d) {
    const parts = [];
    const outline = list(d.outline).map((o) => el('li', {}, text(o)));
    if (outline.length) parts.push(el('p', { class: 'label' }, 'Outline'), el('ol', { 'data-testid': 'draft-outline' }, outline));
    if (d.history_summary) parts.push(el('p', { class: 'label' }, 'So far'), el('p', { class: 'text', 'data-testid': 'draft-history' }, text(d.history_summary)));
    const src = sources(d.citations, 'draft-citation');
    if (src) parts.push(src);
    const guard = guardLine(d.guard);
    if (guard) parts.push(guard);
    const grounding = groundingLine(d.grounding);
    if (grounding) parts.push(grounding);
    ui.draftExtra.replaceChildren(...parts);
    ui.draftExtra.hidden = parts.length === 0;
  }

  function restoreText() {
    if (replaced === null) return;
    ui.reply.value = replaced;
    replaced = null;
    ui.restore.hidden = true;
    say('Your text is back.');
    ui.reply.focus();
  }

  function sendReply() {
    if (!requireConversation()) return undefined;
    const id = current.id;
    const content = ui.reply.value;
    if (!content.trim()) {
      say('Write a message first.');
      ui.reply.focus();
      return undefined;
    }
    return perform(
      'Sending the reply',
      async () => {
        await api('POST', `/v1/conversations/${encodeURIComponent(id)}/messages`, { content });
        // Cleared only once the server has it; new text typed meanwhile is kept.
        if (current && current.id === id && ui.reply.value === content) ui.reply.value = '';
        unsent.delete(id);
        replaced = null;
        ui.restore.hidden = true;
        say('Reply sent.');
        await openConversation(id, { quiet: true });
      },
      { button: ui.send },
    );
  }

  function summarize() {
    if (!requireConversation()) return undefined;
    const id = current.id;
    return perform(
      'Summarizing',
      async () => {
        const d = obj(await api('POST', '/v1/assist/summarize', { conversation_id: id }));
        if (!current || current.id !== id) return;
        const s = obj(d.summary);
        const parts = [];
        if (d.text) parts.push(el('p', { class: 'text', 'data-testid': 'summary-text' }, text(d.text)));
        const rows = [];
        if (s.issue) rows.push(metaRow('Issue', el('span', { class: 'text' }, text(s.issue))));
        const steps = list(s.steps).map((x) => el('li', {}, text(x)));
        if (steps.length) rows.push(metaRow('Steps', el('ol', {}, steps)));
        if (s.outcome) rows.push(metaRow('Outcome', el('span', { class: 'text' }, text(s.outcome))));
        const open = list(s.open_questions).map((x) => el('li', {}, text(x)));
        if (open.length) rows.push(metaRow('Open questions', el('ul', {}, open)));
        if (rows.length) parts.push(el('dl', { class: 'meta' }, rows.flat()));
        ui.summaryBody.replaceChildren(...(parts.length ? parts : [el('p', {}, 'The summary came back empty.')]));
        ui.summary.hidden = false;
        say('Summary ready.');
      },
      { button: ui.summarize },
    );
  }

  function kbDraft() {
    if (!requireConversation()) return undefined;
    const id = current.id;
    return perform(
      'Writing a KB draft',
      async () => {
        const d = obj(await api('POST', '/v1/assist/kb-draft', { conversation_id: id }));
        const head = `Draft ${text(d.id) || '(no id)'}${d.path ? ` saved as ${text(d.path)}` : ''}${d.status ? ` (${text(d.status)})` : ''}.`;
        ui.kbResultBody.replaceChildren(
          el('p', { 'data-testid': 'kb-result-head' }, head),
          el('pre', { class: 'markdown', 'data-testid': 'kb-markdown', tabindex: '0' }, text(d.markdown)),
        );
        ui.kbResult.hidden = false;
        say(`${head} It waits for approval under KB drafts.`);
        await refreshDrafts({ quiet: true });
      },
      { button: ui.kbDraft },
    );
  }

  // ---- KB drafts

  function draftsOf(payload) {
    if (Array.isArray(payload)) return payload;
    const p = obj(payload);
    return list(p.data).length ? p.data : list(p.drafts);
  }

  function draftItem(raw) {
    const d = obj(raw);
    const id = text(d.id);
    const title = text(d.title) || text(d.path) || id;
    const details = [d.path && d.path !== title ? text(d.path) : null, d.status ? text(d.status) : null].filter(Boolean);
    const approve = el(
      'button',
      { type: 'button', class: 'secondary', 'data-testid': 'approve', 'data-id': id, 'aria-label': `Approve ${title}` },
      'Approve',
    );
    approve.addEventListener('click', () => approveDraft(id, title, approve));
    return el(
      'li',
      { 'data-testid': 'kb-draft-item', 'data-id': id },
      el('span', { class: 'draft-title' }, title),
      details.length ? el('span', { class: 'hint' }, details.join(' · ')) : null,
      approve,
    );
  }

  function refreshDrafts({ quiet = false } = {}) {
    return perform(
      quiet ? 'Refreshing KB drafts' : 'Loading KB drafts',
      async () => {
        let payload;
        try {
          payload = await api('GET', '/v1/kb/drafts');
        } catch (err) {
          if (err instanceof ApiFailure && (err.status === 404 || err.status === 405)) {
            ui.drafts.replaceChildren();
            ui.draftsEmpty.textContent = 'This server does not offer KB drafts.';
            ui.draftsEmpty.hidden = false;
            return;
          }
          throw err;
        }
        const items = draftsOf(payload).filter((d) => obj(d).status === undefined || obj(d).status === 'draft');
        ui.drafts.replaceChildren(...items.map(draftItem));
        ui.draftsEmpty.textContent = 'No drafts waiting for approval.';
        ui.draftsEmpty.hidden = items.length > 0;
        if (!quiet) say(`${items.length} KB draft${items.length === 1 ? '' : 's'} waiting for approval.`);
      },
      { quiet, button: quiet ? null : ui.draftsRefresh },
    );
  }

  /** What an approval did to the index, from whichever of its fields the server sent. */
  function indexNote(r) {
    const reload = obj(r.index);
    const index = reload.index ? obj(reload.index) : reload;
    const version = index.index_version ?? index.version;
    const parts = [];
    if (r.searchable === true) parts.push('It is searchable now.');
    if (r.searchable === false) parts.push('It is not searchable yet.');
    if (version !== undefined && version !== null) {
      const docs = typeof index.documents === 'number' ? `, ${index.documents} articles` : '';
      parts.push(`Index version ${text(version)}${docs}.`);
    }
    return parts.length ? ` ${parts.join(' ')}` : '';
  }

  function approveDraft(id, title, button) {
    return perform(
      `Approving ${title}`,
      async () => {
        const r = obj(await api('POST', `/v1/kb/${encodeURIComponent(id)}/approve`, {}));
        await refreshDrafts({ quiet: true });
        say(`Approved ${title}${r.path ? `, published as ${text(r.path)}` : ''}.${indexNote(r)}`);
        ui.draftsRefresh.focus(); // its button is gone with the item
      },
      { button },
    );
  }

  // ---- start, refresh, wiring

  function stopTimer() {
    if (timer !== null) clearInterval(timer);
    timer = null;
  }

  function startTimer() {
    stopTimer();
    timer = setInterval(() => {
      if (key() === null || document.hidden) return;
      refreshQueue({ quiet: true });
      if (current) openConversation(current.id, { quiet: true });
    }, REFRESH_MS);
  }

  function loadAll() {
    startTimer();
    refreshQueue();
    refreshDrafts({ quiet: true });
    loadActions();
  }

  ui.keyForm.addEventListener('submit', (e) => {
    e.preventDefault();
    const k = ui.keyInput.value.trim();
    if (!k) {
      say('Enter a valid agent key.');
      ui.keyInput.focus();
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, k);
    ui.keyInput.value = '';
    showKeyState();
    hideError();
    const pending = awaitingKey;
    awaitingKey = null;
    loadAll();
    // A refused action other than the loads above runs again with the new key.
    if (pending && !/^(Loading|Refreshing) (the queue|KB drafts)$/.test(pending.label)) pending.run();
  });

  ui.forgetKey.addEventListener('click', () => {
    sessionStorage.removeItem(KEY_STORAGE);
    stopTimer();
    awaitingKey = null;
    current = null;
    unsent.clear();
    ui.queue.replaceChildren();
    ui.drafts.replaceChildren();
    ui.queueMore.hidden = true;
    ui.conversation.hidden = true;
    ui.placeholder.hidden = false;
    showKeyState();
    hideError();
    say('Key forgotten; the queue is hidden until a key is entered.');
    ui.keyInput.focus();
  });

  ui.errorDismiss.addEventListener('click', () => {
    hideError();
    say('');
  });
  ui.actionForm.addEventListener('submit', (e) => {
    e.preventDefault();
    runAction();
  });
  ui.queueRefresh.addEventListener('click', () => refreshQueue());
  ui.queueMore.addEventListener('click', loadMore);
  ui.filter.addEventListener('change', () => refreshQueue());
  ui.draftsRefresh.addEventListener('click', () => refreshDrafts());
  ui.takeover.addEventListener('click', () => statusChange('Taking over', 'takeover', (id) => `You took over ${id}.`));
  ui.resolve.addEventListener('click', () => statusChange('Resolving', 'resolve', (id) => `${id} is resolved.`));
  ui.summarize.addEventListener('click', summarize);
  ui.kbDraft.addEventListener('click', kbDraft);
  ui.draft.addEventListener('click', draftReply);
  ui.restore.addEventListener('click', restoreText);
  ui.replyForm.addEventListener('submit', (e) => {
    e.preventDefault();
    sendReply();
  });
  ui.reply.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && !e.isComposing) {
      e.preventDefault();
      sendReply();
    }
  });
  ui.note.addEventListener('keydown', (e) => {
    // Enter in the note asks for a draft instead of sending the reply.
    if (e.key === 'Enter' && !e.isComposing) {
      e.preventDefault();
      draftReply();
    }
  });

  showKeyState();
  if (key() !== null) loadAll();
  else say('Enter your agent key to load the queue.');
})();
