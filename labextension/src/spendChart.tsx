/**
 * The spend section's chart: one bar per day as plain SVG, coloured by Lab's CSS variables
 * (style/base.css), so light and dark themes both look native and nothing heavy is loaded.
 */
import React from 'react';

import { budgetText, chartBars, dayLabel, formatUsd, IBudget, IDaySpend } from './model';

/** Chart units: each day is SLOT wide (its bar BAR wide), the tallest bar HEIGHT. */
const SLOT = 10;
const BAR = 7;
const HEIGHT = 40;

export function SpendChart(props: { days: IDaySpend[] }): JSX.Element | null {
  const days = props.days;
  if (!days.length) {
    return null;
  }
  const bars = chartBars(days, HEIGHT);
  const top = Math.max(...days.map(d => d.usd));
  const first = dayLabel(days[0].day);
  const last = dayLabel(days[days.length - 1].day);
  const summary = `Spend per day, ${first} to ${last}: highest ${formatUsd(top)}`;
  return (
    <figure className="jp-gpu-chart">
      <svg
        className="jp-gpu-chart-svg"
        viewBox={`0 0 ${days.length * SLOT} ${HEIGHT}`}
        preserveAspectRatio="none"
        role="img"
        aria-label={summary}
      >
        {bars.map((b, i) => (
          <rect
            key={b.day}
            className={
              'jp-gpu-chart-bar' + (b.usd > 0 ? '' : ' jp-mod-zero') + (i === bars.length - 1 ? ' jp-mod-today' : '')
            }
            data-day={b.day}
            x={i * SLOT + (SLOT - BAR) / 2}
            y={HEIGHT - b.height}
            width={BAR}
            height={b.height}
          >
            <title>{b.label}</title>
          </rect>
        ))}
      </svg>
      <figcaption className="jp-gpu-chart-axis">
        <span>{first}</span>
        <span>max {formatUsd(top)}/day</span>
        <span>{last}</span>
      </figcaption>
    </figure>
  );
}

export function Budgets(props: { budgets: IBudget[] }): JSX.Element | null {
  if (!props.budgets.length) {
    return null;
  }
  return (
    <ul className="jp-gpu-list jp-gpu-budgets">
      {props.budgets.map(b => (
        <li key={b.scope} className="jp-gpu-budget" data-over={b.left_usd <= 0}>
          {budgetText(b)}
        </li>
      ))}
    </ul>
  );
}
